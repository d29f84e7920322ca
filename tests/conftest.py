import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
