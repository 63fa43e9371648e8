"""Linear probing of a frozen encoder (lightning_mim.eval.linear)."""
from __future__ import annotations

import lightning as L
import torch
from PIL import Image
from timm.optim import Lars

from lightning_mim.backbone import BackboneConfig
from lightning_mim.data import MIMDataModule
from lightning_mim.eval.linear import LinearProbe

MICRO = BackboneConfig(size="micro", img_size=16, patch_size=4, in_chans=3)


def test_probe_head_learns_while_the_encoder_gets_no_grad_and_stays_eval() -> None:
    torch.manual_seed(0)
    probe = LinearProbe(MICRO, num_classes=4)
    encoder_before = {key: value.clone() for key, value in probe.encoder.state_dict().items()}
    images, labels = torch.randn(32, 3, 16, 16), torch.arange(32) % 4
    optimizer = Lars(probe.head.parameters(), lr=0.5, momentum=0.9)
    probe.train()
    assert not probe.encoder.training and probe.head.training
    losses = []
    for _ in range(15):
        loss = probe.training_loss(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    assert all(parameter.grad is None and not parameter.requires_grad for parameter in probe.encoder.parameters())
    for key, value in probe.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key
    bn = probe.head[0]
    assert not bn.affine and bn.eps == 1e-6


class _EncoderModeCheck(L.Callback):
    def __init__(self) -> None:
        self.seen = 0

    def on_train_batch_start(self, trainer: L.Trainer, module: LinearProbe, batch, batch_idx: int) -> None:
        assert not module.encoder.training and module.head.training
        self.seen += 1


def test_probe_fits_with_lightning_and_logs_metrics() -> None:
    L.seed_everything(0, verbose=False)
    data = MIMDataModule(source="synthetic", synthetic_size=64, synthetic_image_size=16, synthetic_classes=6,
                         batch_size=16, num_workers=0, persistent_workers=False, pin_memory=False)
    data.setup("fit")
    probe = LinearProbe(MICRO, num_classes=data.num_classes, optim={"warmup_epochs": 1})
    check = _EncoderModeCheck()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", log_every_n_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[check])
    trainer.fit(probe, datamodule=data)
    assert check.seen == 8
    assert {"val/top1", "val/top5", "train/loss", "train/lr"} <= set(trainer.callback_metrics)
    assert probe.peak_lr == 0.1 * 16 / 256
    assert all(parameter.grad is None for parameter in probe.encoder.parameters())
    transform = probe.train_transform((0.5,) * 3, (0.5,) * 3)
    assert transform(Image.new("RGB", (20, 20))).shape == (3, 16, 16)
