"""DVC stage entry points: parse arguments, load params, call medfusion, write files."""

import os

# The project's own commands keep telemetry and update checks off.
for _key, _value in {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}.items():
    os.environ.setdefault(_key, _value)
