"""The torch.compile option: every method's compute_losses traces into one graph (fullgraph, no graph breaks) and
gives the eager losses; a CLI fit runs with it. aot_eager traces without code generation, so this stays fast on the
CPU; the inductor speed-up is measured by the benchmark on a GPU."""
import inspect

import pytest
import torch

import lightning_mim.methods as methods
from lightning_mim.callbacks import CompileLosses
from lightning_mim.cli import run_cli
from micro_methods import METHODS as ALL_METHODS
from micro_methods import micro_method
from test_cli import MICRO_SYNTHETIC

METHODS = {cls.__name__: cls for cls in ALL_METHODS}


def test_every_method_is_checked():
    assert set(METHODS) == {"BEiT", "BeyondMasking", "LUT", "MAE", "MaPeT", "SimMIM", "SymMIM"}
    classes = {name: getattr(methods, name) for name in methods.__all__}
    concrete = {name for name, cls in classes.items()
                if inspect.isclass(cls) and issubclass(cls, methods.MIMMethod) and not inspect.isabstract(cls)}
    assert concrete == set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_compiled_losses_equal_eager_in_one_graph(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = micro_method(METHODS[name])
    images = torch.randn(4, 3, 16, 16)
    views = model.validation_views(images)
    torch.manual_seed(1)
    eager = model.compute_losses(views)
    compiled = torch.compile(model.compute_losses, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    traced = compiled(views)
    assert eager.keys() == traced.keys()
    for key in eager:
        torch.testing.assert_close(traced[key], eager[key], rtol=1e-5, atol=1e-6)


def test_cli_fit_with_compile(tmp_path):
    torch._dynamo.reset()
    cli = run_cli(["fit", *MICRO_SYNTHETIC, "--compile.enabled", "true", "--compile.backend", "aot_eager",
                   "--compile.fullgraph", "true", "--trainer.max_steps", "3", "--trainer.logger", "false",
                   "--trainer.limit_val_batches", "0", "--knn.every_n_epochs", "1000",
                   "--trainer.default_root_dir", str(tmp_path)])
    assert getattr(cli.model.compute_losses, "_compiled_by_lightning_mim", False)
    assert cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_disabled_by_default():
    assert CompileLosses().enabled is False
