"""``pip install peace-core`` without the ``train`` extra: the model, checkpoints, embedding and
zero-shot metrics work; plots are skipped and TensorBoard asks for the extra by name."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from peace_core.config_io import read_config_file

REPO = Path(__file__).resolve().parents[1]

#: Runs in a fresh interpreter in which matplotlib and tensorboard cannot be imported.
_WITHOUT_EXTRAS = textwrap.dedent(
    """
    import sys

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("matplotlib", "tensorboard"):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, NotInstalled())

    import json, tempfile
    from pathlib import Path
    import peace_core
    from peace_core.evaluation.report import _pyplot, write_evaluation_report
    from peace_core.evaluation.zero_shot import EvaluationResult, SkipCounts
    from peace_core.extras import MissingExtraError
    from peace_core.pretrain.logging import MetricsLogger, plot_metrics

    out = Path(tempfile.mkdtemp())
    model = peace_core.create_model("tiny", modalities=["vision", "text"])
    path = peace_core.save_pretrained(model, out / "model.safetensors")
    again = peace_core.from_pretrained(path)
    embedding = again.encode(text=["a red star"])["text"]
    assert embedding.shape == (1, 128), embedding.shape

    result = EvaluationResult({}, {}, {"text": 1}, SkipCounts(), {})
    metrics = write_evaluation_report(result, out / "eval")
    assert json.loads((out / "eval" / "metrics.json").read_text())["samples"] == {"text": 1}
    assert "peace-core[train]" in metrics["plots_skipped"]
    assert plot_metrics([{"step": 1, "loss": 1.0}], out / "plot.png") is None
    for attempt in (_pyplot, lambda: MetricsLogger(out / "run", tensorboard=True)):
        try:
            attempt()
        except MissingExtraError as err:
            assert "peace-core[train]" in str(err), err
        else:
            raise AssertionError("expected MissingExtraError")
    assert not any(m.split(".")[0] in ("matplotlib", "tensorboard") for m in sys.modules)
    print("ok")
    """
)


def test_training_extras_are_optional_dependencies() -> None:
    project = read_config_file(REPO / "pyproject.toml")["project"]
    base = " ".join(project["dependencies"])
    assert "matplotlib" not in base and "tensorboard" not in base
    assert set(project["optional-dependencies"]["train"]) == {"matplotlib", "tensorboard"}


def test_embedding_and_metrics_work_without_the_train_extra() -> None:
    run = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")
