"""Data for the zoo and for evaluation: synthetic domains, real-text corpora, loading and tokenising."""
