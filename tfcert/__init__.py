"""tfcert: certified adversarial robustness for TensorFlow 2 / Keras 3.

Public API::

    tfcert.stats.clopper_pearson / simultaneous_bounds        # sound statistics (float64)
    tfcert.bounds.renyi_radius / cohen_radius / pixeldp_radius / gaussian_kl_bound
    tfcert.layers.GaussianNoise / RandomizedDiscretization / RandomizedMixture / ...
    tfcert.SmoothedClassifier(base_model, num_classes, noise)  # STN Algorithm 1
    tfcert.StabilityModel(base_model, sigma, gamma)            # STN Section 5.1
    tfcert.export.export_saved_model(smoothed, path, num_samples, alpha)

Submodules are imported on first use, so ``import tfcert`` is cheap and scripts can
configure TensorFlow's logging before TensorFlow loads.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("adversarial_training", "analysis", "attacks", "bounds", "certificate",
               "certification", "cli", "confidence_sequences", "data", "denoising", "devices",
               "export", "keys", "kl", "layers", "models", "results", "robust_accuracy", "runs",
               "scripts", "sequential", "smoothing", "stats", "training")
_NAMES = {
    "SmoothedClassifier": "smoothing", "Certificate": "certificate",
    "StabilityModel": "training", "GaussianAugmentationModel": "training",
    "RobustTrainingModel": "training", "ConsistencyModel": "training",
    "MACERModel": "training", "SmoothAdvModel": "training",
    "AdversarialTrainingModel": "adversarial_training", "TRADESModel": "adversarial_training",
    "DenoiserModel": "denoising",
    "StoppingRule": "sequential", "certify_sequential": "sequential",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"tfcert.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"tfcert.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'tfcert' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBMODULES, *_NAMES])
