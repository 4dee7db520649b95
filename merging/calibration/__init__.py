"""Calibration-based merging: Expert Merging and Expert Merging++ (arXiv 2509.25712), and AdaMerging."""

from merging.calibration.calibrate import CalibrationResult, calibrate, calibrated_tensors
from merging.calibration.coefficients import Coefficients
from merging.calibration.params import AdaMergingParams, CalibrationParams, params_for

__all__ = ["AdaMergingParams", "CalibrationParams", "CalibrationResult", "Coefficients", "calibrate",
           "calibrated_tensors", "params_for"]
