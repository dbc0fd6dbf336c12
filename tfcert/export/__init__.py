"""SavedModel export of a smoothed classifier for TensorFlow Serving (guide: export/README.md).

By job: :mod:`tfcert.export.saved_model` assembles and writes an export,
:mod:`tfcert.export.warmup` encodes its warmup requests, :mod:`tfcert.export.reading`
reads an export back (config asset, signatures, forbidden ops).  Their public names are
imported here.

``export_saved_model(smoothed, path, num_samples, alpha, bound="renyi")`` writes a
SavedModel whose signatures run the whole of STN Algorithm 1 inside the graph: the
Monte-Carlo sampling loop (chunked passes of at most ``pass_size`` noisy inputs, so
memory stays bounded for n = 100,000), the vote counts, the simultaneous Clopper-Pearson
bounds (:func:`tfcert.stats.simultaneous_bounds`, bisection on ``tf.math.betainc``) and
the radius (:mod:`tfcert.bounds`, float64).  The graph holds core TensorFlow ops only
(no TFP, no Python functions, no XLA): it loads in a process that has TensorFlow and
nothing else, in ``saved_model_cli run``, and in TF Serving on CPU or GPU.

Signatures (each takes ``images``: float32 ``[batch, H, W, C]`` in [0, 1], any batch):

``serving_default``
    Certified prediction with fresh noise.  Outputs per image: ``prediction`` (int64,
    −1 = abstain), ``radius`` (float32, certified ℓ2 radius, rounded down; 0 on
    abstain), ``counts`` (int64 ``[batch, num_classes]``), ``p1_lower`` and
    ``p2_upper`` (float64 confidence bounds the radius was computed from).
``predict``
    Smoothed prediction with abstention (Cohen et al.'s PREDICT): the top class if a
    two-sided binomial test of its count against the runner-up's rejects equality at
    level α, else −1.  Outputs ``prediction`` (int64), ``counts``, ``p_value`` (float64).
``certify_seeded``, ``predict_seeded``
    The same with a second input ``seed`` (int64 ``[batch]``, one per image).  Each
    image's noise is keyed by its own seed (run key ``[seed, 0]``, image index 0, as
    `SmoothedClassifier.certify(image[None], seed=seed)` keys it), so its answer
    depends only on its image and its seed: identical on every call, whatever else is in
    the batch (also under TF Serving's request batching), and equal to the Python API's.
    TF Serving's row format needs every input to share the batch dimension, and
    signature inputs cannot be optional, hence separate signatures rather than an
    optional scalar seed.
``certify_target``, ``certify_target_seeded``
    Certification with early stopping (:mod:`tfcert.sequential`; simultaneous
    statistics, or Cohen's with ``target_statistics="cohen"``: a class selected first on
    ``target_selection_samples`` draws of the separate selection stream) in one in-graph
    ``tf.while_loop`` whose every look calls `tfcert.sequential.look`, the function the
    Python API calls.  A second input
    ``target_radius`` (float32 ``[batch]``, finite, >= 0) gives each image's target.
    The bounds, looks and stopping rules are those of the export's
    `tfcert.sequential.StoppingRule` (``early_stopping=``, ``--stopping_method``;
    default: the mixture confidence sequence, first look after 32 draws, then every
    +10%, 10% of α kept for Clopper-Pearson bounds at the last look), recorded in the
    config asset (``stopping_method``, ``target_looks``, ``target_levels``,
    ``target_final_level``, ``target_statistics``, ...).  At look j every still
    undecided image gets draws ``n_{j-1} … n_j − 1`` (only the undecided images are
    gathered into the sampling passes) and its certificate from all its votes so far; it stops once certified at
    radius >= its target, or once the target is out of reach (its reachable radius is
    below it); the loop ends when every image has stopped or after the n-th draw.
    Outputs: those of ``certify_seeded`` (the certificate of the look where the image
    stopped) and ``num_samples`` (int64, draws spent per image, selection draws included).
    ``certify_target_seeded`` takes ``seed`` as ``certify_seeded`` and gives the answer
    of ``sc.certify(image[None], n, alpha, bound, early_stopping=rule, seed=seed)``
    with the export's rule and ``target_radius``.

Fresh noise: the unseeded signatures draw their run key from a
``RandomUniformInt`` op with zero seed attributes, which TensorFlow seeds from OS
entropy when the model is loaded: noise differs per call, per concurrent request and
per server restart.  (The noise layer's ``keras.random.SeedGenerator`` would restart
from the saved state on every server start and replay the same noise.)

Bad requests fail with ``InvalidArgument`` before any certificate is returned: wrong
rank or image size, wrong dtype (the signature's TensorSpec), NaN/Inf, pixel values
outside [0, 1], a ``seed`` whose length differs from the batch, a ``target_radius``
that is not one finite number >= 0 per image.

Every input and output of every signature has a leading batch dimension (``-1``), as
TF Serving's request batching (``--enable_batching``) needs: it concatenates the inputs
of several requests along dimension 0 and splits every output along it.

n, σ, α, the bound, the pass size and the checkpoints of the early-stopping
signatures are baked in; they are also attributes of the loaded object
(``loaded.num_samples``, ``loaded.sigma`` (NaN for non-Gaussian noise),
``loaded.alpha``, ``loaded.bound``, ``loaded.serving_device``, ``loaded.target_looks``,
``loaded.target_levels``, ...) and written to the
asset ``assets/tfcert_config.json``.  The automatic pass size depends on the device the
server runs on (:func:`serving_pass_size`).  :func:`versioned_path` gives TF Serving's
``<base>/<name>/<version>/`` layout.

Warmup: ``assets.extra/tf_serving_warmup_requests`` holds one ``PredictionLog`` per
signature (TF Serving's SavedModel warmup: a TFRecord file the server replays at load,
so the first real request does not pay for graph optimisation and kernel creation).
Each is a ``PredictRequest`` of one image of 0.5s (and seed 0, target radius 0): it
costs what one such request costs, at most n noisy samples per certificate signature.
The records are encoded here (:func:`prediction_log`), so exporting needs TensorFlow
only, not tensorflow-serving-api.
"""

from tfcert.export.reading import (CONFIG_ASSET, FORBIDDEN_OPS, XLA_ATTRIBUTE, forbidden_ops,
                                   read_config, signature_summary)
from tfcert.export.saved_model import (BOUNDS, SERVING_DEVICES, SIGNATURES, ExportConfig,
                                       export_saved_model, serving_pass_size, versioned_path)
from tfcert.export.warmup import (WARMUP_FILE, WARMUP_PIXEL, WARMUP_VALUES, prediction_log,
                                  write_warmup_requests)

__all__ = ["BOUNDS", "CONFIG_ASSET", "FORBIDDEN_OPS", "SERVING_DEVICES",
           "SIGNATURES", "WARMUP_FILE", "WARMUP_PIXEL", "WARMUP_VALUES", "XLA_ATTRIBUTE",
           "ExportConfig", "export_saved_model", "forbidden_ops", "prediction_log",
           "read_config", "serving_pass_size", "signature_summary", "versioned_path",
           "write_warmup_requests"]
