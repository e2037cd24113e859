"""The MLflow pyfunc models that :mod:`llm2clip.registry` logs: what a served model runs.

Two models, two registered names:

- :class:`LLM2CLIPPyfunc` (``<name>``): the vision tower + head, the text adapter and the
  image preprocessing, from one exported model dir (``model.safetensors`` +
  ``llm2clip_config.json``).
- :class:`CaptionEncoderPyfunc` (``<name>-caption-encoder``): the caption encoder (the tuned
  LLM, its tokenizer and settings). It is registered once per distinct encoder and shared by
  every vision version; a vision version names it in ``model_config["caption_encoder_uri"]``
  (``models:/<name>-caption-encoder/<version>``) and loads it, through the registry, the first
  time captions are given (an 8B LLM is never loaded just to embed images).

Input (a pandas DataFrame; both columns optional, at least one present; a row may fill either):

    ===========  ======================================================================
    ``image``    encoded image bytes (JPEG, PNG, ...; base64 text in JSON requests, as
                 MLflow serving sends binary columns), or a ``uint8`` array ``(H, W, 3)``
                 (``(H, W)`` grey and ``(H, W, 4)`` RGBA are accepted too), or None
    ``caption``  a caption string, or None
    ===========  ======================================================================

In a JSON request (``dataframe_split`` / ``dataframe_records``) MLflow base64-decodes the
``image`` column and cannot take a null there: send images and captions in separate requests
(or fill both in every row). In Python, any mix of None works.

Output: a DataFrame with the same rows and ``image_embedding`` (for an ``image`` column) and/or
``text_embedding`` (for a ``caption`` column): lists of ``embed_dim`` floats, L2-normalised,
None where the row had no input. Param ``batch_size`` (default 32).

The models are "models from code" (:data:`MODEL_CODE` is the whole script MLflow stores): no
object is pickled, and the ``llm2clip`` package travels as the model's ``code_paths``.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from typing import Any

import mlflow
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

IMAGE, CAPTION = "image", "caption"
IMAGE_EMBEDDING, TEXT_EMBEDDING, LLM_EMBEDDING = "image_embedding", "text_embedding", "llm_embedding"
MODEL_ARTIFACT, ENCODER_ARTIFACT = "model", "caption_encoder"
ENCODER_URI_KEY = "caption_encoder_uri"

# What MLflow stores as each model's python_model (models from code: nothing is pickled).
MODEL_CODE = {
    "vision": "from mlflow.models import set_model\n"
              "from llm2clip.pyfunc import LLM2CLIPPyfunc\n\nset_model(LLM2CLIPPyfunc())\n",
    "caption_encoder": "from mlflow.models import set_model\n"
                       "from llm2clip.pyfunc import CaptionEncoderPyfunc\n\n"
                       "set_model(CaptionEncoderPyfunc())\n",
}


def vision_signature():
    """``image`` (binary) / ``caption`` (string), both optional -> the two embedding columns."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE, required=False),
                       ColSpec(DataType.string, CAPTION, required=False)]),
        outputs=Schema([ColSpec(Array(DataType.float), IMAGE_EMBEDDING, required=False),
                        ColSpec(Array(DataType.float), TEXT_EMBEDDING, required=False)]),
        params=ParamSchema([ParamSpec("batch_size", DataType.long, 32)]),
    )


def caption_encoder_signature():
    """``caption`` (string) -> ``llm_embedding`` (the LLM vector the adapter takes)."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, CAPTION)]),
        outputs=Schema([ColSpec(Array(DataType.float), LLM_EMBEDDING)]),
        params=ParamSchema([ParamSpec("batch_size", DataType.long, 32)]),
    )


def vision_input_example() -> pd.DataFrame:
    """One 8x8 grey PNG and no caption (a caption would load the LLM when MLflow checks it)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({IMAGE: [buffer.getvalue()], CAPTION: [None]})


def decode_image(value: Any):
    """One ``image`` cell -> an RGB PIL image.

    Args:
        value: Encoded image bytes, base64 text of them, a ``uint8`` array ``(H, W[, C])`` or a
            PIL image.

    Raises:
        ValueError: Anything else, or bytes that are not an image.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, np.ndarray):
        if value.ndim == 3 and value.shape[2] == 1:
            value = value[..., 0]
        if value.dtype != np.uint8 or value.shape[2:] not in ((), (3,), (4,)) or value.ndim < 2:
            raise ValueError(f"image arrays must be uint8 (H, W), (H, W, 3) or (H, W, 4); "
                             f"got {value.dtype} {value.shape}")
        return Image.fromarray(value).convert("RGB")
    if isinstance(value, str):
        value = base64.b64decode(value, validate=False)
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(bytes(value)))
            image.load()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"image bytes could not be decoded ({len(value)} bytes): {err}") from err
        return image.convert("RGB")
    raise ValueError(f"unsupported image value of type {type(value).__name__}; pass encoded image "
                     "bytes (JPEG/PNG) or a uint8 (H, W, 3) array")


def _present(value: Any) -> bool:
    """False for missing cells (None, NaN, pd.NA: pandas fills gaps with any of them)."""
    if isinstance(value, (bytes, bytearray, memoryview, str, np.ndarray)):
        return True
    return not pd.isna(value)


def _column(frame: pd.DataFrame, vectors: Any, rows: list[int]) -> list[Any]:
    """Scatter ``(len(rows), D)`` vectors into a list with None for the other rows."""
    out: list[Any] = [None] * len(frame)
    for row, vector in zip(rows, np.asarray(vectors, dtype=np.float32), strict=True):
        out[row] = vector.tolist()
    return out


def _batch_size(params: dict[str, Any] | None) -> int:
    return int((params or {}).get("batch_size") or 32)


class LLM2CLIPPyfunc(mlflow.pyfunc.PythonModel):
    """Images and/or captions -> L2-normalised LLM2CLIP embeddings (see the module docstring)."""

    def load_context(self, context) -> None:
        import torch

        from llm2clip.vision.model import LLM2CLIPModel

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model = LLM2CLIPModel.from_pretrained(context.artifacts[MODEL_ARTIFACT], device=device)
        self._encoder_uri = (context.model_config or {}).get(ENCODER_URI_KEY) or ""
        # Where the caption encoder is looked up later: the registry this model was loaded from.
        self._registry_uri = mlflow.get_registry_uri()
        self._encoder = None
        self._lock = threading.Lock()

    def caption_encoder(self):
        """The registered caption encoder (a ``CaptionEncoder``), loaded on first use."""
        with self._lock:
            if self._encoder is None:
                if not self._encoder_uri:
                    raise ValueError("this model version was registered without a caption encoder, so it "
                                     "cannot embed captions; register it again with caption_encoder_dir")
                from mlflow.tracking._tracking_service.utils import _use_tracking_uri

                log.info("loading caption encoder %s", self._encoder_uri)
                with _use_tracking_uri(self._registry_uri):
                    loaded = mlflow.pyfunc.load_model(self._encoder_uri)
                encoder = loaded.unwrap_python_model().encoder
                if encoder.dim != self._model.llm_dim:
                    raise ValueError(f"caption encoder {self._encoder_uri} gives {encoder.dim}-d vectors; "
                                     f"the adapter expects {self._model.llm_dim}")
                self._encoder = encoder
            return self._encoder

    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Embed the ``image`` and/or ``caption`` column.

        Args:
            context: The MLflow context (unused).
            model_input: ``N`` rows with an ``image`` and/or a ``caption`` column.
            params: ``batch_size``.

        Returns:
            ``N`` rows with ``image_embedding`` / ``text_embedding`` (lists of floats or None).
        """
        frame = pd.DataFrame(model_input).reset_index(drop=True)
        if IMAGE not in frame and CAPTION not in frame:
            raise ValueError(f"input needs an {IMAGE!r} and/or a {CAPTION!r} column; "
                             f"got {list(frame.columns)}")
        batch = _batch_size(params)
        out = pd.DataFrame(index=frame.index)
        if IMAGE in frame:
            rows = [i for i, v in enumerate(frame[IMAGE]) if _present(v)]
            images = [decode_image(frame[IMAGE].iloc[i]) for i in rows]
            vectors = self._model.encode_image(images, batch_size=batch) if rows else np.empty((0, 0))
            out[IMAGE_EMBEDDING] = _column(frame, vectors, rows)
        if CAPTION in frame:
            rows = [i for i, v in enumerate(frame[CAPTION]) if _present(v)]
            vectors = np.empty((0, 0))
            if rows:
                captions = [str(frame[CAPTION].iloc[i]) for i in rows]
                llm = self.caption_encoder().encode(captions, batch_size=batch)  # (n, llm_dim)
                vectors = self._model.encode_text_embeddings(llm)
            out[TEXT_EMBEDDING] = _column(frame, vectors, rows)
        return out


class CaptionEncoderPyfunc(mlflow.pyfunc.PythonModel):
    """Captions -> L2-normalised LLM caption embeddings (the input of the text adapter)."""

    def load_context(self, context) -> None:
        from llm2clip.text.encoder import CaptionEncoder

        self.encoder_dir = context.artifacts[ENCODER_ARTIFACT]
        self.encoder = CaptionEncoder.from_pretrained(self.encoder_dir)

    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Embed the ``caption`` column -> ``llm_embedding`` (lists of floats)."""
        frame = pd.DataFrame(model_input).reset_index(drop=True)
        if CAPTION not in frame:
            raise ValueError(f"input needs a {CAPTION!r} column; got {list(frame.columns)}")
        vectors = self.encoder.encode([str(c) for c in frame[CAPTION]], batch_size=_batch_size(params))
        return pd.DataFrame({LLM_EMBEDDING: [v.tolist() for v in vectors.numpy()]})
