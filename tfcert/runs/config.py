"""The options of a run as frozen dataclasses: `TrainConfig`, `CertifyConfig`, `AttackConfig`.

Each field is a flag of the matching script (``tfcert-train``, ``tfcert-certify``,
``tfcert-attack``) with the flag's name, default and help, and the scripts define their
flags from these fields (`tfcert.scripts.config_flags`).  A config checks itself when
made and raises `tfcert.cli.CliError` (a ValueError) with the one-line message the
script prints, so a run started from Python and one started from the command line have
the same options, the same ``config.json`` and so the same identity: either can resume
the other.  List options are tuples of strings, as the flags give them (numbers passed
from Python are turned into strings).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from tfcert import cli


def option(default: Any, help: str, kind: str, *, choices: tuple[str, ...] | None = None,
           lower_bound: float | None = None, upper_bound: float | None = None) -> Any:
    """A config field: its default and its flag's help, kind and bounds.

    Args:
        default: the default value (a tuple for a list option).
        help: the flag's help text.
        kind: the absl flag type: string, integer, float, bool, list or enum; or dataset
            (a string flag; from Python also images and labels, `tfcert.data.in_memory`).
        choices: the values of an enum option.
        lower_bound, upper_bound: the bounds of a number option.
    """
    metadata = {"help": help, "kind": kind, "choices": choices, "lower_bound": lower_bound,
                "upper_bound": upper_bound}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Config:
    """Checks each option against its kind and bounds, then `_check`s the combination."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _checked(field, getattr(self, field.name)))
        self._check()

    def _check(self) -> None:
        """Checks that the options go together (each config's own rules)."""

    def to_dict(self) -> dict[str, Any]:
        """Every option by name: what ``config.json`` records (with a run's additions)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every option's default by name (for settings an older ``config.json`` lacks)."""
        return {field.name: field.default for field in dataclasses.fields(cls)}


def _checked(field: dataclasses.Field, value: Any) -> Any:
    """``value`` of an option in its normal form (floats as float, lists as tuples of
    strings), or a `cli.CliError` naming the flag."""
    meta, name = field.metadata, f"--{field.name}"
    kind = meta["kind"]
    if value is None:
        cli.require(field.default is None, f"{name} must be set, got None")
        return value
    if kind == "list":
        items = value.split(",") if isinstance(value, str) else value
        return tuple(str(item) for item in items)
    if kind == "dataset":
        from tfcert import data

        return value if isinstance(value, (str, data.Arrays)) else data.in_memory(value)
    if kind == "enum":
        cli.require(value in meta["choices"], f"{name} must be one of "
                    f"{', '.join(meta['choices'])}, got {value!r}")
        return value
    if kind in ("string", "bool"):
        expected = str if kind == "string" else bool
        cli.require(isinstance(value, expected), f"{name} must be a {expected.__name__}, got "
                    f"{value!r}")
        return value
    integer = kind == "integer"
    cli.require(isinstance(value, numbers.Integral if integer else numbers.Real)
                and not isinstance(value, bool),
                f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    value = int(value) if integer else float(value)
    lower, upper = meta["lower_bound"], meta["upper_bound"]
    cli.require(lower is None or not value < lower, f"{name} must be >= {lower}, got {value}")
    cli.require(upper is None or not value > upper, f"{name} must be <= {upper}, got {value}")
    return value


def _finite(config: _Config, *names: str) -> None:
    """Refuses infinite or NaN values of the float options ``names`` (absl's bounds let
    them through)."""
    for name in names:
        value = getattr(config, name)
        cli.require(value is None or math.isfinite(value),
                    f"--{name} must be a finite number, got {value}")


DATASETS_HELP = (
    "Dataset (see tfcert.data): mnist_subset, fashion_mnist, digits, mnist, cifar10, "
    "imagenet2012; any tensorflow-datasets image classification name (e.g. svhn_cropped, "
    "cifar100); dir:PATH, a folder with one subfolder of images per class; npz:PATH, a NumPy "
    "file with arrays x (uint8 in [0, 255] or float in [0, 1]) and y (int labels). A folder "
    "or a file is one split. From Python also (x, y) arrays or a tf.data.Dataset.")
DATA_DIR_HELP = "Folder with prepared tfds data or the Fashion-MNIST IDX files."
DOWNLOAD_HELP = "Let tensorflow-datasets download the data (needs internet)."
IMAGE_SIZE_HELP = ("H,W: resize the images of a dir: folder or a tfds dataset to this size "
                   "(needed where they differ in size; default: their common size).")


def _check_data(config: "_Config") -> None:
    """Checks the data options a config has (``image_size``; arrays only with the local
    engine)."""
    from tfcert import data

    try:
        data.check_source(config.dataset)
        data.parse_image_size(config.image_size)
    except data.DataError as err:
        raise cli.CliError(str(err)) from None
    cli.require(getattr(config, "engine", "local") == "local" or isinstance(config.dataset, str),
                "--engine=beam needs data its workers can read (a dataset name, dir:PATH or "
                "npz:PATH), not arrays passed in Python")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _DataOptions(_Config):
    """The dataset and example-selection options of the evaluation runs."""

    dataset: "str | data.Arrays" = option("mnist_subset", DATASETS_HELP, "dataset")
    split: str = option(
        "test", "Dataset split: train or test; for other tfds datasets any tfds split string "
        "(test[:10%]); ignored for dir:, npz: and arrays (one split each).", "string")
    data_dir: str | None = option(None, DATA_DIR_HELP, "string")
    download: bool = option(False, DOWNLOAD_HELP, "bool")
    image_size: tuple[str, ...] | None = option(None, IMAGE_SIZE_HELP, "list")
    num_examples: int = option(500, "How many examples to certify or attack.", "integer",
                               lower_bound=1)
    skip: int = option(0, "Skip this many examples of the split first.", "integer",
                       lower_bound=0)
    stride: int = option(1, "Use every stride-th example after --skip.", "integer",
                         lower_bound=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _EngineOptions(_Config):
    """Where the rows are computed: in this process or on an Apache Beam pipeline."""

    engine: str = option(
        "local", "local: compute the rows in this process; beam: on an Apache Beam pipeline "
        "(tfcert.beam_pipeline, docs/SCALING.md; pip install 'tfcert[beam]'), with the same "
        "rows.", "enum", choices=("local", "beam"))
    beam_options: str = option(
        "", "--engine=beam: Beam pipeline options, e.g. \"--runner=DirectRunner "
        "--direct_num_workers=2 --direct_running_mode=multi_processing\" (and tfcert's "
        "--intra_op_threads=N, TensorFlow threads per worker, and --tfcert_work_dir=PATH, the "
        "staged model and part files).", "string")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CertifyConfig(_DataOptions, _EngineOptions):
    """A certification run (`tfcert.runs.certify`, ``tfcert-certify``): each field is the flag
    of the same name; ``analyze`` or ``merge`` make it an analysis or a merge of runs."""

    model: str | None = option(None, "Trained base classifier (.keras file giving logits).",
                               "string")
    denoiser: str | None = option(
        None, "Denoised smoothing (Salman et al. 2020): a denoiser (.keras, noisy image -> "
        "image) in front of --model, e.g. trained with tfcert.DenoiserModel; the smoothed "
        "classifier is then model(denoiser(x + noise)), so a classifier trained without "
        "noise can be certified.", "string")
    sigma: float | None = option(None, "Noise std σ of the smoothed classifier ([0, 1] pixel "
                                 "scale).", "float")
    num_samples: int = option(1000, "n: noisy samples per example for the bounds.", "integer",
                              lower_bound=1)
    num_selection_samples: int = option(
        100, "n0: selection samples of --statistics=cohen (ignored otherwise); with "
        "--target_radius (early stopping) a few suffice, e.g. 8 (docs/PERFORMANCE.md).",
        "integer", lower_bound=1)
    alpha: float = option(0.001, "Failure probability α of each certificate.", "float")
    bounds: tuple[str, ...] = option(
        ("renyi", "cohen"), "Radii to compute on the same counts: renyi (STN Thm. 2), cohen "
        "(Cohen et al. 2019), pixeldp (Lecuyer et al.).", "list")
    statistics: str = option(
        "simultaneous", "simultaneous: Clopper-Pearson bounds over all classes with Bonferroni "
        "(STN); cohen: n0 samples pick the class, n fresh samples bound it.", "enum",
        choices=("simultaneous", "cohen"))
    batch_size: int | None = option(
        None, "Noisy inputs per forward pass (default: the fastest measured on this machine, "
        "cached; TFCERT_PASS_SIZE=memory: from the model's activation memory).", "integer",
        lower_bound=1)
    compute_dtype: str = option(
        "float32", "Precision of the base model's forward passes: float32; bfloat16 (Keras "
        "mixed_bfloat16 clone; faster only on hardware with native bfloat16, e.g. AVX-512 "
        "BF16/AMX CPUs or Ampere+ GPUs; votes may differ slightly); auto (bfloat16 iff the "
        "hardware has it). See docs/PERFORMANCE.md.", "enum",
        choices=("float32", "bfloat16", "auto"))
    target_radius: float | None = option(
        None, "Early stopping (tfcert.sequential): stop sampling an example once it is "
        "certified at this radius (first of --bounds), or once that is out of reach; "
        "--num_samples is then the most samples per example and the TSV gets a samples "
        "column. Off by default.", "float", lower_bound=0.0)
    min_radius_gain: float | None = option(
        None, "Early stopping, budget mode: stop an example once more samples (up to "
        "--num_samples) cannot raise its radius by more than this. Off by default; combines "
        "with --target_radius.", "float", lower_bound=0.0)
    stopping_method: str = option(
        "mixture", "Early stopping bounds: mixture (beta-binomial mixture confidence sequence, "
        "Robbins), betting (Waudby-Smith & Ramdas), checkpoints (Clopper-Pearson at geometric "
        "checkpoints, α split over them). See docs/PERFORMANCE.md.", "enum",
        choices=("mixture", "betting", "checkpoints"))
    first_checkpoint: int = option(
        100, "Early stopping: samples at the first look, every method (tfcert.sequential's own "
        "default for the confidence sequences is 32; 100 here keeps older run directories "
        "resumable).", "integer", lower_bound=1)
    checkpoint_growth: float = option(
        2.0, "Early stopping with --stopping_method=checkpoints: ratio of consecutive "
        "checkpoints, > 1 (the confidence sequences look every 10% more samples).", "float")
    images_per_step: int = option(
        10, "Examples certified together between writes (does not change any result: each "
        "example's noise is its own).", "integer", lower_bound=1)
    seed: int = option(0, "Random seed of the noise.", "integer")
    stn_factor: bool = option(
        False, "Report certified accuracy × (1 − α), STN's convention ('multiply 95%'); the TSV "
        "rows are unaffected.", "bool")
    max_radius: float | None = option(
        None, "Largest radius of the accuracy table/plot (default: 4σ, or the largest radius "
        "seen with --analyze).", "float")
    grid_points: int = option(11, "Radii in the table (the plot uses 200).", "integer",
                              lower_bound=2)
    output_dir: str = option("runs/certify", "Run directory (config, TSV, table, plot).",
                             "string")
    analyze: tuple[str, ...] | None = option(
        None, "Only analyse these finished certify.tsv files together.", "list")
    merge: tuple[str, ...] | None = option(
        None, "Only join these finished shard run directories (--num_shards runs of one "
        "command) into --output_dir, as one run.", "list")
    num_shards: int = option(
        1, "Split the selected examples into this many shards (one process or machine each; "
        "join them with --merge).", "integer", lower_bound=1)
    shard_index: int = option(
        0, "This process's shard: the selected examples at positions i with i mod "
        "--num_shards = --shard_index.", "integer", lower_bound=0)
    defense: str = option(
        "gaussian", "gaussian: ℓ2 radii of the Gaussian-smoothed classifier (--bounds); "
        "randdisc / randdisc_downsampled: ℓ∞ KL certificates of randomized discretization "
        "(Zhang & Liang Prop. 1-2) over --eps, with --sigma as the pixel noise σ.", "enum",
        choices=("gaussian", "randdisc", "randdisc_downsampled"))
    eps: tuple[str, ...] = option(("0.01", "0.02", "0.05", "0.1"),
                                  "ℓ∞ budgets of the KL certificate.", "list")
    num_clusters: int = option(2, "RandDisc k (paper: MNIST 2, ImageNet 5).", "integer",
                               lower_bound=1)
    center_stddev: float | None = option(None, "RandDisc center noise τ (default: --sigma).",
                                         "float")
    num_candidates: int = option(100, "RandDisc candidate pixels s.", "integer", lower_bound=1)
    fixed_centers: tuple[str, ...] | None = option(
        None, "Image-independent RandDisc centers (grayscale), one per cluster, e.g. 0,1; "
        "removes Prop. 1's center term.", "list")
    num_center_samples: int = option(
        5000, "Center sets per example for the (1 − α′) betting upper bound on Prop. 1's "
        "expectation over the centers.", "integer", lower_bound=2)
    kl_alpha: float = option(
        0.001, "Failure probability α′ of U_KL's Monte-Carlo part (Prop. 1); a KL certificate "
        "fails with probability ≤ α + α′.", "float")

    def _check(self) -> None:
        if self.analyze or self.merge:
            return
        _check_data(self)
        require = cli.require
        require(self.model is not None, "--model is required (a .keras file from train.py)")
        require(self.sigma is not None and self.sigma > 0, "--sigma must be > 0")
        require(0 < self.alpha < 1, "--alpha must be in (0, 1)")
        early = self.target_radius is not None or self.min_radius_gain is not None
        require(not early or self.defense == "gaussian",
                "--target_radius/--min_radius_gain (early stopping) need --defense=gaussian")
        require(self.checkpoint_growth > 1, "--checkpoint_growth must be > 1")
        if self.defense == "gaussian":
            from tfcert.certificate import RADII

            bad = [b for b in self.bounds if b not in RADII]
            require(not bad and bool(self.bounds),
                    f"unknown --bounds {bad}; choose from {', '.join(sorted(RADII))}")
        else:
            grid = cli.eps_grid(self.eps, "inf")
            require(self.defense != "randdisc_downsampled" or max(grid) <= 0.3,
                    "--defense=randdisc_downsampled covers --eps up to 0.3 (the down-sampling "
                    "of Zhang & Liang's Table 1)")
            require(self.center_stddev is None or self.center_stddev > 0,
                    "--center_stddev must be > 0")
            require(0 < self.kl_alpha < 1, "--kl_alpha must be in (0, 1)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackConfig(_DataOptions, _EngineOptions):
    """An attack sweep (`tfcert.runs.attack`, ``tfcert-attack``): each field is the flag of
    the same name; ``analyze`` makes it an analysis of finished runs."""

    model: str | None = option(None, "Base classifier (.keras file giving logits).", "string")
    denoiser: str | None = option(
        None, "Denoised smoothing: a denoiser (.keras, noisy image -> image) between the "
        "defense's randomization and --model (as tfcert-certify --denoiser); the attacked "
        "model is then model(denoiser(defense(x))), whitebox through all three.", "string")
    defense: str = option(
        "none", "none; gaussian (N(0, σ²) noise, one draw); randdisc / randmix (Zhang & Liang, "
        "k = --num_clusters, σ, τ); smoothed (majority vote of --num_votes noisy draws, STN "
        "Alg. 1); bitdepth, jpeg, tvm, resizepad (Zhang & Liang Table 2).", "enum",
        choices=("none", "gaussian", "randdisc", "randmix", "smoothed", "bitdepth", "jpeg",
                 "tvm", "resizepad"))
    sigma: float | None = option(
        None, "Noise σ of gaussian / smoothed, pixel noise σ of randdisc / randmix ([0, 1] "
        "scale; paper MNIST: 0.15 for randdisc).", "float")
    center_stddev: float | None = option(
        None, "RandDisc/RandMix center noise τ (default: --sigma).", "float")
    num_clusters: int = option(2, "RandDisc/RandMix k (MNIST 2, ImageNet 5).", "integer",
                               lower_bound=1)
    num_votes: int = option(100, "Noisy draws of the smoothed majority vote.", "integer",
                            lower_bound=1)
    bits: int = option(2, "Bits per channel of bitdepth.", "integer", lower_bound=1,
                       upper_bound=16)
    jpeg_quality: int = option(75, "JPEG quality of jpeg.", "integer", lower_bound=0,
                               upper_bound=100)
    tvm_weight: float = option(0.2, "Total-variation weight λ of tvm.", "float",
                               lower_bound=0.0)
    attack: str = option(
        "pgd_linf", "pgd_linf / pgd_l2 (Madry et al., EOT); cw_l2 (Carlini-Wagner, EOT); "
        "boundary (Brendel et al., decision-based); transfer (PGD on --source_model).", "enum",
        choices=("pgd_linf", "pgd_l2", "cw_l2", "boundary", "transfer"))
    eps: tuple[str, ...] | None = option(
        None, "Perturbation budgets ([0, 1] pixel scale; ℓ∞ for pgd_linf and transfer with "
        "--transfer_norm=inf, ℓ2 otherwise), e.g. 0.05,0.1,0.2,0.3.", "list")
    source_model: str | None = option(
        None, "Model attacked white-box by --attack=transfer (.keras, e.g. trained with "
        "train.py --method=pgd).", "string")
    transfer_norm: str = option("inf", "Norm of the PGD attack on the source.", "enum",
                                choices=("inf", "2"))
    steps: int | None = option(
        None, "Attack iterations (default: PGD 40, C&W 100 per binary-search round, boundary "
        "1000).", "integer", lower_bound=1)
    step_size: float | None = option(None, "PGD step (default 2.5·ε/steps).", "float",
                                     lower_bound=0.0)
    eot_samples: int | None = option(
        None, "EOT draws per gradient (default: 20 for randomized defenses as in Zhang & "
        "Liang's MNIST runs, else 1).", "integer", lower_bound=1)
    loss: str = option("ce", "PGD loss: cross-entropy or C&W margin.", "enum",
                       choices=("ce", "cw"))
    confidence: float = option(0.0, "κ of cw_l2 and of --loss=cw (the paper variant: 50).",
                               "float", lower_bound=0.0)
    initial_const: float = option(1e-2, "C&W initial constant c.", "float", lower_bound=0.0)
    binary_search_steps: int = option(5, "C&W binary-search rounds over c.", "integer",
                                      lower_bound=1)
    learning_rate: float = option(5e-2, "C&W Adam learning rate.", "float", lower_bound=0.0)
    trials: int = option(20, "Boundary-attack proposals per example and step.", "integer",
                         lower_bound=1)
    batch_size: int = option(
        100, "Examples attacked together between writes (a Beam step); never changes a row "
        "(every draw is keyed per example).", "integer", lower_bound=1)
    seed: int = option(0, "Random seed (attack starts, EOT and defense draws, votes), keyed "
                       "with each example's index.", "integer", lower_bound=0)
    output_dir: str = option("runs/attack", "Run directory (config, TSV, table, plot).",
                             "string")
    analyze: tuple[str, ...] | None = option(
        None, "Only draw these finished attack.tsv files on one figure.", "list")

    def _check(self) -> None:
        if self.analyze:
            return
        _check_data(self)
        from tfcert.robust_accuracy import attack_norm

        require = cli.require
        require(self.model is not None, "--model is required (a .keras file from train.py)")
        cli.eps_grid(self.eps, attack_norm(self))
        _finite(self, "sigma", "center_stddev", "tvm_weight", "step_size", "confidence",
                "initial_const", "learning_rate")
        needs_sigma = self.defense in ("gaussian", "smoothed", "randdisc", "randmix")
        require(not needs_sigma or (self.sigma is not None and self.sigma > 0),
                f"--defense={self.defense} needs --sigma > 0")
        require(self.center_stddev is None or self.center_stddev > 0,
                "--center_stddev must be > 0")
        require((self.attack == "transfer") == (self.source_model is not None),
                "--source_model is needed by --attack=transfer and only by it")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(_Config):
    """A training run (`tfcert.runs.train`, ``tfcert-train``): each field is the flag of the
    same name."""

    dataset: "str | data.Arrays" = option("mnist_subset", DATASETS_HELP, "dataset")
    data_dir: str | None = option(None, DATA_DIR_HELP, "string")
    download: bool = option(False, DOWNLOAD_HELP, "bool")
    image_size: tuple[str, ...] | None = option(None, IMAGE_SIZE_HELP, "list")
    model: str | None = option(
        None, "Base classifier: stn_mnist, cifar_cnn, small_cnn or app:<keras.applications "
        "name>. Default: stn_mnist for 28x28 data, cifar_cnn for cifar10, small_cnn for "
        "digits, app:ResNet50 for imagenet2012, for other data cifar_cnn (RGB) or stn_mnist; "
        "dncnn (the denoiser) for --method=denoiser.",
        "string")
    method: str = option(
        "stn", "Training method: standard; gaussian (Gaussian augmentation, Cohen et al.); stn "
        "(stability training with noise, STN Sec. 5.1); consistency (Gaussian augmentation + "
        "consistency regularization, Jeong & Shin 2020); macer (certified-radius "
        "maximisation, Zhai et al. 2020); smoothadv (PGD on the smoothed classifier, Salman et "
        "al. 2019); pgd (Madry PGD adversarial training); trades (TRADES); denoiser (a "
        "denoiser for the frozen --classifier, denoised smoothing, Salman et al. 2020: "
        "model.keras is then the denoiser).", "enum",
        choices=("standard", "gaussian", "stn", "consistency", "macer", "smoothadv", "pgd",
                 "trades", "denoiser"))
    classifier: str | None = option(
        None, "--method=denoiser: the trained classifier (.keras, logits) the denoiser is "
        "for; it is never changed.", "string")
    denoiser_objective: str = option(
        "stab_mse", "--method=denoiser: mse (‖D(x + δ) − x‖²), stab (cross-entropy of the "
        "classifier on D(x + δ) against its own label on x), stab_mse (mse for the first "
        "--denoiser_mse_epochs, then stab); see tfcert.DenoiserModel.", "enum",
        choices=("mse", "stab", "stab_mse"))
    denoiser_mse_epochs: int = option(
        5, "--method=denoiser --denoiser_objective=stab_mse: epochs of MSE pre-training.",
        "integer", lower_bound=1)
    sigma: float = option(
        0.7, "Noise std σ on the [0, 1] pixel scale (gaussian, stn, consistency, macer, "
        "smoothadv; also the noise of the reported noisy accuracy).", "float", lower_bound=0.0)
    gamma: float = option(1.0, "Weight γ of the stability loss (stn).", "float",
                          lower_bound=0.0)
    stability_target: str = option(
        "stop_gradient", "Stability loss of stn (see tfcert.StabilityModel): paper (gradient "
        "through both predictions), stop_gradient (clean prediction as a fixed target), "
        "stn_code (STN's released code: the clean logits as the target).", "enum",
        choices=("paper", "stop_gradient", "stn_code"))
    num_noise_samples: int | None = option(
        None, "Noise draws m per image (consistency, macer, smoothadv). Default: the paper's, "
        "2 / 16 / 2.", "integer", lower_bound=1)
    consistency_lambda: float = option(10.0, "Weight λ of the KL term (consistency).", "float",
                                       lower_bound=0.0)
    consistency_eta: float = option(0.5, "Weight η of the entropy term (consistency).", "float",
                                    lower_bound=0.0)
    macer_lambda: float = option(12.0, "Weight λ of the robustness term (macer).", "float",
                                 lower_bound=0.0)
    macer_gamma: float = option(8.0, "Hinge γ on the radius term (macer).", "float",
                                lower_bound=0.0)
    macer_beta: float = option(16.0, "Inverse temperature β of the robustness term (macer).",
                               "float", lower_bound=0.0)
    smoothadv_eps: float = option(0.25, "ℓ2 radius ε of the SmoothAdv attack ([0, 1] scale).",
                                  "float", lower_bound=0.0)
    warmup_epochs: int = option(
        10, "Epochs over which the SmoothAdv ε grows linearly to --smoothadv_eps (1 = no "
        "warm-up).", "integer", lower_bound=1)
    eps: float = option(0.3, "Attack budget ε for pgd / trades training ([0, 1] scale).",
                        "float", lower_bound=0.0)
    norm: str = option("inf", "Norm of the training attack (pgd / trades).", "enum",
                       choices=("inf", "2"))
    attack_steps: int = option(10, "PGD steps of the training attack (pgd / trades / "
                               "smoothadv).", "integer", lower_bound=1)
    beta: float = option(6.0, "TRADES weight β of KL(f(x) || f(x_adv)).", "float",
                         lower_bound=0.0)
    epochs: int = option(10, "Training epochs (the most, with --patience).", "integer",
                         lower_bound=1)
    validation_split: float = option(
        0.0, "Fraction of the training split held out (stratified, fixed by --seed) for "
        "validation and --patience; 0 validates on the test split, for monitoring only. Data "
        "of one split (dir:, npz:, arrays) needs it > 0: the held-out part is then also the "
        "test split of metrics.json.",
        "float", lower_bound=0.0, upper_bound=0.5)
    patience: int = option(
        0, "Stop when the validation accuracy under one fixed draw of N(0, σ²) noise "
        "(val_noisy_accuracy) has not improved for this many epochs, and keep the best "
        "epoch's weights; 0 trains all --epochs. Needs --validation_split > 0.", "integer",
        lower_bound=0)
    batch_size: int = option(128, "Training batch size (global: split over the replicas of "
                             "--strategy).", "integer", lower_bound=1)
    strategy: str = option(
        "default", "tf.distribute strategy: default (one device), mirrored (every GPU of this "
        "machine); multi_worker is refused: Keras 3's fit does not support it.", "enum",
        choices=("default", "mirrored", "multi_worker"))
    mixed_precision: str = option(
        "float32", "Keras dtype policy while training (mixed_float16: GPUs with tensor cores, "
        "loss scaling added; mixed_bfloat16: TPUs and recent CPUs/GPUs). The saved model.keras "
        "always computes in float32.", "enum",
        choices=("float32", "mixed_float16", "mixed_bfloat16"))
    learning_rate: float = option(1e-3, "Adam learning rate (STN code: 1e-3).", "float",
                                  lower_bound=0.0)
    seed: int = option(0, "Random seed (weights, shuffling, training noise).", "integer")
    output_dir: str = option("runs/train", "Where to write the model, config and logs.",
                             "string")
    verbose: str = option(
        "auto", "Keras fit verbosity (auto: progress bar on a terminal, a line per epoch "
        "otherwise).", "enum", choices=("auto", "0", "1", "2"))
    tensorboard_dir: str | None = option(
        None, "Also write Keras TensorBoard logs (losses and metrics per epoch) to this "
        "folder (off by default).", "string")

    def _check(self) -> None:
        _check_data(self)
        require = cli.require
        require(self.strategy != "multi_worker",
                "--strategy=multi_worker: Keras 3's model.fit does not run under "
                "MultiWorkerMirroredStrategy (keras-team/keras#20585, open); train with "
                "--strategy=mirrored on one machine's GPUs")
        require(self.method in ("standard", "pgd", "trades") or self.sigma > 0,
                f"--method={self.method} needs --sigma > 0")
        require((self.method == "denoiser") == (self.classifier is not None),
                "--method=denoiser needs --classifier=<the classifier's .keras file> (and "
                "--classifier is only for --method=denoiser)")
        require(self.method != "denoiser" or self.denoiser_objective != "stab_mse"
                or self.denoiser_mse_epochs < self.epochs,
                "--denoiser_objective=stab_mse needs --denoiser_mse_epochs < --epochs (the "
                "epochs after them fine-tune with stab)")
        require(self.patience == 0 or self.validation_split > 0,
                "--patience needs --validation_split > 0: early stopping on the test split "
                "would select the model on the data it is evaluated on")


def _document(config_class: type[_Config]) -> None:
    """Appends the options (each flag's help, its default) to the class's docstring."""
    lines = [f"        {f.name}: {f.metadata['help']} Default: {f.default!r}."
             for f in dataclasses.fields(config_class)]
    config_class.__doc__ = f"{config_class.__doc__}\n\n    Attributes:\n" + "\n".join(lines)


_document(CertifyConfig)
_document(AttackConfig)
_document(TrainConfig)
