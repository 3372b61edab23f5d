"""What every logged model carries: the classifier on its own, and the file MLflow loads it with."""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent  # car_classifier.py and pyfunc_model.py, copied into each model as they are
