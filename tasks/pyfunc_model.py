"""MLflow "model from code": the pyfunc that serves a stage1 bundle.

MLflow executes this file to build the model (no cloudpickle of a Python object). Input: a DataFrame
with a column `image` holding base64-encoded JPEG/PNG bytes (what a StreetVision validator sends).
Output: `p_roadwork` and `decision` per row.
"""

from __future__ import annotations

import base64

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class BundleModel(PythonModel):
    def load_context(self, context) -> None:
        from stage1core.bundle import load_bundle

        # the fingerprint recorded at registration: a bundle edited and re-hashed afterwards is refused;
        # with $STAGE1_BUNDLE_PUBLIC_KEY set, load_bundle also checks the team's signature
        expected = (context.model_config or {}).get("bundle_fingerprint")
        self.predictor = load_bundle(context.artifacts["bundle"], device="cpu", expected_fingerprint=expected)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = [base64.b64decode(v) for v in model_input["image"]]
        results = self.predictor.predict(images)
        return pd.DataFrame(
            {"p_roadwork": [r["p_roadwork"] for r in results], "decision": [r["decision"] for r in results]}
        )


mlflow.models.set_model(BundleModel())
