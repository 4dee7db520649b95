"""Calibration-based merging: Expert Merging and Expert Merging++ (arXiv 2509.25712)."""

from merging.calibration.calibrate import CALIBRATED_METHODS, CalibrationResult, calibrate, calibrated_tensors
from merging.calibration.coefficients import Coefficients
from merging.calibration.params import CalibrationParams

__all__ = ["CALIBRATED_METHODS", "CalibrationParams", "CalibrationResult", "Coefficients", "calibrate",
           "calibrated_tensors"]
