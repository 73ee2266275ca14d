"""Calibration data: prompt sources and templates, CoT generation engines, calibration sets."""
