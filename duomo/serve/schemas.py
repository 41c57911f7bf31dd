"""Request and response bodies of the HTTP API (pydantic models; they also make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_BEAM = 8
MAX_CAPTION_LENGTH = 64  # tokens; the model's text positions may allow fewer (decoding stops there)


class ErrorDetail(BaseModel):
    """OpenAI-style error description."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: `{"error": {"message", "type", ...}}`."""

    error: ErrorDetail


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request: texts, or images as `data:image/...;base64,` URLs."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a string or a list of strings; a string starting with data:image/ is an image"
    )
    model: str | None = Field(
        None, description="the served model's name (or 'default'); None: the served model"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="truncate to this many dimensions and renormalise")
    user: str | None = None


class EmbeddingData(BaseModel):
    """One embedding in an embeddings response."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    """Token counts (text tokens including start/end; images count 0)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """OpenAI's embeddings response."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class EmbedRequest(BaseModel):
    """duomo's own embed request: texts and images (base64 or data URLs) in one call."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(default_factory=list)
    images: list[str] = Field(default_factory=list, description="base64 bytes of image files, or data: URLs")


class EmbedResponse(BaseModel):
    """L2-normalised embeddings, in input order, per kind."""

    model: str
    dim: int
    text_embeddings: list[list[float]]
    image_embeddings: list[list[float]]


class ClassifyRequest(BaseModel):
    """Zero-shot classification of one image over the given labels."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="base64 bytes of an image file, or a data: URL")
    labels: list[str] = Field(..., description="candidate labels, e.g. ['cat', 'dog']")
    top_k: int | None = Field(None, ge=1, description="return only the best k labels")
    templates: list[str] | None = Field(None, description="prompt templates with '{}' for the label")


class LabelScore(BaseModel):
    """One label and its probability."""

    label: str
    probability: float


class ClassifyResponse(BaseModel):
    """Labels ranked by probability, best first."""

    model: str
    labels: list[LabelScore]


class SearchRequest(BaseModel):
    """Search the index by a text query or an example image (exactly one)."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(None, description="text to search for")
    image: str | None = Field(None, description="example image: base64 bytes or a data: URL")
    k: int = Field(12, ge=1, description="number of results")


class SearchResult(BaseModel):
    """One hit: the indexed file, its cosine similarity, and where to fetch it from this server."""

    path: str
    score: float
    url: str


class SearchResponse(BaseModel):
    """Hits best first."""

    model: str
    query: str | None
    k: int
    index_size: int
    results: list[SearchResult]


class VQARequest(BaseModel):
    """A question about one image, for the server's BEiT-3 VQA model."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="base64 bytes of an image file, or a data: URL")
    question: str = Field(..., description="e.g. 'what color is the star?' (at most max_question_chars)")


class VQAResponse(BaseModel):
    """The best answer from the model's answer vocabulary and its probability (sigmoid score, 0..1)."""

    model: str
    answer: str
    score: float


class CaptionRequest(BaseModel):
    """Caption one image with the server's BEiT-3 captioning model."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="base64 bytes of an image file, or a data: URL")
    beam: int | None = Field(
        None, ge=1, le=MAX_BEAM, description="beam width; 1: greedy; None: 8 when guided, else 1"
    )
    guide: bool = Field(True, description="false: decode without the server's caption guide (a CLIP)")
    max_length: int | None = Field(
        None, ge=1, le=MAX_CAPTION_LENGTH, description="most tokens to generate; None: 32"
    )


class CaptionResponse(BaseModel):
    """The generated caption."""

    model: str
    caption: str
    guide: str | None = Field(None, description="the CLIP that guided the beam search; null: unguided")


class QueueHealth(BaseModel):
    """One batcher's state."""

    depth: int
    max_queue: int
    running: bool


class HealthResponse(BaseModel):
    """Liveness and what is served."""

    status: Literal["ok", "draining"]
    model: str
    embed_dim: int
    auth_required: bool
    index: dict | None
    tasks: dict[str, str | None] = Field(
        default_factory=dict, description="the model behind /vqa and /caption, null where none is configured"
    )
    generator: str | None = Field(None, description="the text-to-image generator served, if any")
    queues: dict[str, QueueHealth]
    limits: dict[str, int]


class ImageGenerationRequest(BaseModel):
    """OpenAI's images.generate request, plus duomo's sampler settings (send them in `extra_body`)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., description="what to draw")
    model: str | None = Field(None, description="the served generator's name (or 'default'); None: it")
    n: int = Field(1, description="images to make")
    size: str | None = Field(
        None, description="WxH, square: the generator's own size or a whole multiple of it (upscaled)"
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="b64_json: base64 PNG; url: the same PNG as a data: URL (nothing is hosted)"
    )
    output_format: Literal["png"] = "png"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    negative_prompt: str | None = Field(None, description="duomo: what to steer away from")
    steps: int | None = Field(None, description="duomo: sampler steps (default: the generator's)")
    guidance: float | None = Field(None, description="duomo: classifier-free guidance scale")
    sampler: str | None = Field(None, description="duomo: dpm, ddim, euler_a or ddpm")
    seed: int | None = Field(None, description="duomo: image i uses seed + i (default: random)")


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat.completions request (text and image_url content parts), plus duomo's decoding extras
    (`top_k`, `repetition_penalty`; send them in `extra_body`)."""

    model_config = ConfigDict(extra="ignore")

    messages: list[dict[str, Any]] = Field(..., description="the conversation, oldest first")
    model: str | None = Field(None, description="the served chat model's name (or 'default'); None: it")
    max_tokens: int | None = Field(None, description="most tokens in the reply")
    max_completion_tokens: int | None = Field(None, description="the same, OpenAI's newer name")
    temperature: float = Field(1.0, description="0: greedy; OpenAI's default is 1")
    top_p: float = Field(1.0, description="nucleus sampling")
    stop: str | list[str] | None = Field(None, description="stop before any of these strings")
    stream: bool = Field(False, description="server-sent events, one per piece of text, then data: [DONE]")
    stream_options: dict[str, Any] | None = Field(
        None, description="{'include_usage': true}: usage at the end"
    )
    seed: int | None = Field(None, description="random seed when sampling")
    n: int = Field(1, description="choices per request (1 only)")
    user: str | None = None
    top_k: int = Field(0, description="duomo: sample from the k most likely tokens (0: all)")
    repetition_penalty: float = Field(1.0, description="duomo: > 1 discourages repeated tokens")
