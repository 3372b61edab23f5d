"""The MLflow "models from code" file of every carclf model: MLflow runs it to load one.

carclf never imports this file: `carclf.tracking` hands its path to `mlflow.pyfunc.log_model`
as `python_model`, so no Python object is pickled into the model. The classifier itself is
`car_classifier`, which travels with the model in its `code/` folder (`code_paths`); MLflow
puts that folder on sys.path before running this file, so loading a model needs no carclf.

Input: a DataFrame with a column `image` of encoded image bytes (base64 strings in JSON).
Params: `top_k` (default 3). Output: `class`, `probability`, `top_classes`,
`top_probabilities`, `error` per image.
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

try:
    import car_classifier  # the model's own copy, from its code/ folder
except ModuleNotFoundError as e:
    if e.name != "car_classifier":
        raise
    from carclf import car_classifier  # being logged by carclf: the very file the model ships


class CarClassifierModel(PythonModel):
    def load_context(self, context):
        self.classifier = car_classifier.load_classifier(context.artifacts)

    # The DataFrame hint tells MLflow to check inputs against the logged signature, not to infer one.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        top_k = _top_k((params or {}).get("top_k", car_classifier.DEFAULT_TOP_K))
        return self.classifier.predict(model_input, top_k=top_k)


def _top_k(value) -> int:
    """params.top_k as a whole number of at least 1; else MLflow's invalid-parameter error (a 400 with this
    one line when served, no stack trace)."""
    from mlflow.exceptions import MlflowException

    try:
        top_k = int(value) if float(value) == int(value) else 0
    except (TypeError, ValueError, OverflowError):
        top_k = 0
    if top_k < 1:
        raise MlflowException.invalid_parameter_value(f"params.top_k must be a whole number of at least 1, "
                                                      f"got {str(value)[:40]!r}")
    return top_k


mlflow.models.set_model(CarClassifierModel())
