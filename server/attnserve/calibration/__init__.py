"""Calibration: choose the heads a method acts on from labelled examples, and write the result as
a preset file (`attnserve calibrate`)."""
