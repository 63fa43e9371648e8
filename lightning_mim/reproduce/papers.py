"""The papers `lightning-mim reproduce` runs, their table rows, and the numbers they report.

Every number is copied from the method specs (`../shared/methods/<paper>.md`, not part of this package), with the
section it comes from. A protocol missing from `reported` is one the spec gives no number for: tables show it as
"unknown", never as a value.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# PRESET=demo and PRESET=smoke run every method at one image size: the SimMIM / SymMIM masks need an 8 x 8 patch grid,
# so the 28-px demo recipes (MAE, LUT, Beyond Masking, BEiT, MaPeT) run at 32 px with their size-dependent settings
# scaled by the rule of their paper recipe. One run serves every table it appears in (a paper's and `compare`).
DEMO_IMG_SIZE = 32
DEMO_SIZE = ("--model.backbone.img_size", str(DEMO_IMG_SIZE))
# BEiT's block masks: 75 of 196 patches in blocks of at least 16 (beit.py), the same shares of the 8 x 8 grid.
BEIT_DEMO_MASKS = ("--model.num_masked_patches", str(round(75 * 64 / 196)),
                   "--model.min_masked_per_block", str(round(16 * 64 / 196)))
# Beyond Masking's zoom geometry: a 288-px view around the 224-px crop and a 160-px image in the 224-px canvas.
ZOOM_IN_DEMO = ("--model.zoom_in_margin", str(round(DEMO_IMG_SIZE / 7)))
ZOOM_OUT_DEMO = ("--model.zoom_out_size", str(round(5 * DEMO_IMG_SIZE / 7)))
# The k-means codebook that BEiT and MaPeT predict (the same one: MaPeT's fair setting): `tokenizer fit` arguments.
DEMO_CODEBOOK = ("--features", "pixels", "--patch-size", "4", "--input-size", str(DEMO_IMG_SIZE), "--vocab-size", "512")
TOKENIZER_DEMO = ("--model.tokenizer.input_size", str(DEMO_IMG_SIZE))


@dataclass(frozen=True)
class DemoRow:
    """One method's pre-training at demo and smoke scale: its micro Fashion-MNIST recipe and the arguments that set
    it to the demo's image size; `codebook`: it reads the demo codebook, fitted by a stage before it."""

    key: str
    method: str
    recipe: str
    size_args: tuple[str, ...] = DEMO_SIZE
    codebook: bool = False


def _beyond_masking_demo(objective: str, *size_args: str) -> DemoRow:
    return DemoRow(f"bm_{objective}", "BeyondMasking",
                   f"configs/beyond_masking/vit_micro_p4_demo_fmnist_{objective}.yaml", (*DEMO_SIZE, *size_args))


# Every demo row, in the order `compare` shows them. Beyond Masking's de-colourisation has none: Fashion-MNIST is grey.
DEMO_ROWS: dict[str, DemoRow] = {row.key: row for row in (
    DemoRow("mae", "MAE", "configs/mae/vit_micro_p4_demo_fmnist.yaml"),
    DemoRow("simmim", "SimMIM", "configs/simmim/vit_micro_p4_demo_fmnist.yaml"),
    DemoRow("lut", "LUT", "configs/lut/vit_micro_p4_demo_fmnist.yaml"),
    DemoRow("symmim", "SymMIM", "configs/symmim/vit_micro_p4_demo_fmnist.yaml"),
    DemoRow("beit", "BEiT", "configs/beit/vit_micro_p4_demo_fmnist.yaml",
            (*DEMO_SIZE, *TOKENIZER_DEMO, *BEIT_DEMO_MASKS), codebook=True),
    DemoRow("mapet", "MaPeT", "configs/mapet/vit_micro_p4_demo_fmnist.yaml", (*DEMO_SIZE, *TOKENIZER_DEMO),
            codebook=True),
    _beyond_masking_demo("zoom_in_masking", *ZOOM_IN_DEMO),
    _beyond_masking_demo("masking"),
    _beyond_masking_demo("zoom_in", *ZOOM_IN_DEMO),
    _beyond_masking_demo("zoom_out", *ZOOM_OUT_DEMO),
    _beyond_masking_demo("distortion"),
    _beyond_masking_demo("blur"),
)}


@dataclass(frozen=True)
class Row:
    """One row of a paper's table at paper scale: a pre-training recipe, the fine-tuning recipe of its evaluation,
    and what the paper reports for it (ImageNet-1k top-1, %)."""

    key: str
    method: str
    backbone: str
    recipe: str
    effective_batch: int  # the paper's pre-training batch: per-device batch x devices x nodes x accumulation
    finetune_recipe: str
    source: str  # where `reported` and `effective_batch` come from
    reported: Mapping[str, float] = field(default_factory=dict)
    note: str = ""
    demo: str | None = None  # its DEMO_ROWS key (None: the method's name in lower case); a key not there: no demo row

    @property
    def demo_key(self) -> str:
        return self.demo if self.demo is not None else self.method.lower()


@dataclass(frozen=True)
class Paper:
    key: str
    title: str
    rows: tuple[Row, ...]

    @property
    def demo_keys(self) -> tuple[str, ...]:
        """The demo rows of the paper's rows, in table order."""
        return tuple(dict.fromkeys(row.demo_key for row in self.rows if row.demo_key in DEMO_ROWS))


MAE_VIT_B16 = "configs/mae/vit_b16_1600ep_in1k.yaml"
LUT_FINETUNE = "configs/eval/finetune_lut_vit_b16_in1k.yaml"
SYMMIM_FINETUNE_B = "configs/eval/finetune_symmim_vit_b16_in1k.yaml"
SIMMIM_FINETUNE_B = "configs/eval/finetune_simmim_vit_b16_in1k.yaml"

# MAE ViT-B/16 (official, 1600 epochs) under distribution shift, fine-tuned classifier, top-1 % (lut.md section 4),
# under the protocols `evaluate --protocols finetune,robustness --shift-dir imagenet-a=... ...` writes. Its "IN-C
# error" is the mean corruption error (errors normalised by AlexNet's), which `robustness-finetune` (mean corruption
# accuracy) does not compute: it is kept under its own key, beside no measured value.
MAE_VIT_B16_ROBUSTNESS = {"shift-imagenet-a-finetune": 35.9, "shift-imagenet-r-finetune": 48.3,
                          "shift-imagenet-sketch-finetune": 34.5, "imagenet-c-mce": 51.7}

LUT = Paper("lut", "LUT: Learning with Unmasked Tokens Drives Stronger Vision Learners (Kim et al., ECCV 2024)", (
    Row("mae_vit_b16", "MAE", "ViT-B/16", MAE_VIT_B16, 4096, "configs/eval/finetune_mae_vit_b16_in1k.yaml",
        "lut.md section 4 (MAE as listed by LUT; robustness and transfer: MAE's own README numbers quoted there); "
        "batch: MAE PRETRAIN.md via the recipe",
        {"finetune": 83.7, **MAE_VIT_B16_ROBUSTNESS, "transfer_inat2017": 70.5, "transfer_inat2018": 75.4,
         "transfer_inat2019": 80.5},
        note="LUT's abstract implies 83.6, MAE's own 1600-epoch number (lut.md section 4); LUT's robustness "
             "numbers are not in the spec (unknown)"),
    Row("lut_vit_s16", "LUT", "ViT-S/16", "configs/lut/vit_s16_1600ep_in1k.yaml", 4096, LUT_FINETUNE,
        "lut.md sections 3 and 4", {"finetune": 82.0},
        note="ViT-S pre-training and fine-tuning recipes unknown (lut.md 3.1, 3.2): ViT-B's are used"),
    Row("lut_vit_b16", "LUT", "ViT-B/16", "configs/lut/vit_b16_1600ep_in1k.yaml", 4096, LUT_FINETUNE,
        "lut.md sections 3.1 and 4", {"finetune": 84.2}),
    Row("lut_vit_l16", "LUT", "ViT-L/16", "configs/lut/vit_l16_1600ep_in1k.yaml", 4096, LUT_FINETUNE,
        "lut.md sections 3 and 4", {"finetune": 86.0},
        note="ViT-L pre-training and fine-tuning recipes unknown (lut.md 3.1, 3.2): ViT-B's are used"),
))

SYMMIM = Paper("symmim", "SymMIM: Symmetric masking strategy enhances the performance of Masked Image Modeling "
                         "(Nguyen and Park, ICPR 2024)", (
    Row("simmim_vit_b16", "SimMIM", "ViT-B/16", "configs/simmim/vit_b16_800ep_in1k.yaml", 2048, SIMMIM_FINETUNE_B,
        "symmim.md sections 5 and 6 (SimMIM's own paper, not SymMIM's table)", {"finetune": 83.8},
        note="SimMIM's own recipes: shared relative position bias, its init; fine-tuned with mean pooling and a "
             "relative position bias per block"),
    Row("symmim_vit_b16", "SymMIM", "ViT-B/16", "configs/symmim/vit_b16_800ep_in1k.yaml", 2048, SYMMIM_FINETUNE_B,
        "symmim.md sections 5 and 6: ViT-B top-1 not available",
        note="pre-training values are the spec's fills (symmim.md section 5); epochs unknown (A14)"),
    Row("symmim_vit_l16", "SymMIM", "ViT-L/16", "configs/symmim/vit_l16_800ep_in1k.yaml", 2048,
        "configs/eval/finetune_symmim_vit_l16_in1k.yaml", "symmim.md sections 5 and 6 (abstract)",
        {"finetune": 85.9}, note="pre-training values are the spec's fills (symmim.md section 5); epochs unknown"),
))

BEYOND_MASKING_FINETUNE = "configs/eval/finetune_beyond_masking_vit_b16_in1k.yaml"


def _beyond_masking_row(objective: str, letters: str, top1: float, note: str = "") -> Row:
    """One objective of Beyond Masking: ViT-B/16, 300 epochs at batch 2048 (beyond_masking.md section 3); the
    backbone column names the paper's letter, so a demo row's paper cell lists every objective."""
    return Row(f"bm_{objective}", "BeyondMasking", f"ViT-B/16 {letters}",
               f"configs/beyond_masking/vit_b16_300ep_in1k_{objective}.yaml", 2048, BEYOND_MASKING_FINETUNE,
               "beyond_masking.md sections 3 and 4 (README tables); fine-tuning recipe unknown: the repo's defaults",
               {"finetune": top1}, note=note, demo=f"bm_{objective}")


BEYOND_MASKING = Paper("beyond_masking", "Beyond Masking: Demystifying Token-Based Pre-Training for Vision "
                                         "Transformers (Tian et al., arXiv 2203.14313)", (
    _beyond_masking_row("zoom_in_masking", "(a)+(m)", 83.2, "the published zoomed-in/ folder; its launcher runs 200 "
                        "epochs, the README reports 300 for every result"),
    _beyond_masking_row("masking", "(m)", 82.9, "MAE as re-run in MAE-pytorch (1-D positions, 384 x 4 decoder), not "
                        "official MAE"),
    _beyond_masking_row("zoom_in", "(a)", 82.7, "the published code crashes without masking: every-token centre loss "
                        "assumed"),
    _beyond_masking_row("zoom_out", "(b)", 82.5, "mask ratio 0 assumed (the published engine passes 0.75)"),
    _beyond_masking_row("distortion", "(c)", 82.1),
    _beyond_masking_row("blur", "(d)", 81.8, "the published blur layer crashes: a 3 -> 3 7 x 7 conv and full-mean loss "
                        "assumed"),
    _beyond_masking_row("decolorize", "(e)", 81.4, "1-channel encoder, fine-tuned on grey images; pre-processing "
                        "assumed (the published HSV path cannot run)"),
))


def _mapet_row(method: str, size: str, tokenizer: str) -> Row:
    letter = size[0]
    recipe = (f"configs/mapet/vit_{letter}16_300ep_in1k_{tokenizer}.yaml" if method == "MaPeT" else
              f"configs/beit/vit_b16_300ep_in1k_{tokenizer}.yaml")
    name = {"vqkd": "VQ-KD", "kclip": "k-CLIP"}[tokenizer]
    return Row(f"{method.lower()}_vit_{letter}16_{tokenizer}", method, f"ViT-{letter.upper()}/16 {name}", recipe, 2048,
               f"configs/eval/finetune_mapet_vit_{letter}16_in1k.yaml",
               "mapet.md sections 3-5: the paper's table could not be read, every number unknown",
               note="BEiT-style baseline in MaPeT's fair setting (same tokenizer, data and schedule)"
               if method == "BEiT" else "")


MAPET = Paper("mapet", "Learning to Mask and Permute Visual Tokens for Vision Transformer Pre-Training (Baraldi et "
                       "al., CVIU 2025)", tuple(
    _mapet_row(method, size, tokenizer) for tokenizer in ("vqkd", "kclip")
    for method, size in (("BEiT", "base"), ("MaPeT", "tiny"), ("MaPeT", "small"), ("MaPeT", "base"))))

PAPERS: dict[str, Paper] = {paper.key: paper for paper in (LUT, SYMMIM, BEYOND_MASKING, MAPET)}

# `make compare` at paper scale: each demo row's method with its ViT-B/16 paper recipe (VQ-KD for the token methods).
COMPARE_ROWS: dict[str, Row] = {
    key: next(row for paper in PAPERS.values() for row in paper.rows
              if row.demo_key == key and row.backbone.startswith("ViT-B/16"))
    for key in DEMO_ROWS}
