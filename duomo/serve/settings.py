"""Server configuration: one pydantic model, filled by the CLI (or by hand in tests and embedding apps)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ServeSettings(BaseModel):
    """Everything `create_app` needs: which model and index, batching, and the safety limits."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="model name or path for duomo.load(); None: the default model"
    )
    device: str | None = Field(None, description="torch device; None: CUDA if available, else CPU")
    backend: str = Field("torch", description="torch, onnxruntime or onnxruntime-int8 (duomo.load's backend)")
    index_dir: Path | None = Field(None, description="image index for /search; None: default_index_dir()")
    use_index: bool = Field(True, description="False: no /search and no /images (embeddings only)")
    vqa_model: Path | None = Field(
        None, description="BEiT-3 VQA model folder (duomo beit3-train vqa --out) for /vqa; None: no /vqa"
    )
    caption_model: Path | None = Field(
        None, description="BEiT-3 captioning model folder for /caption; None: no /caption"
    )
    caption_guide: str = Field(
        "auto",
        description="CLIP that guides /caption's beam search: auto (the captioner's recorded "
        "image-tower CLIP, if any), none, or a duomo model name or folder",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch: int = Field(32, ge=1, le=4096, description="most items in one model call")
    max_wait_ms: float = Field(0.0, ge=0, le=10_000, description="longest an item waits for a batch to fill")
    max_queue: int = Field(256, ge=1, description="most items waiting per queue; beyond it requests get 429")
    api_keys: list[str] = Field(default_factory=list, description="accepted Bearer keys; empty: no auth")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body (413 beyond)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest decoded image (width*height)")
    max_inputs: int = Field(128, ge=1, description="most texts+images in one request")
    max_text_chars: int = Field(8192, ge=1, description="longest text, in characters")
    max_labels: int = Field(256, ge=1, description="most labels in one /classify request")
    max_question_chars: int = Field(200, ge=1, description="longest /vqa question, in characters")
    decode_threads: int = Field(4, ge=1, description="most images decoding at once (bounds pixel memory)")
    max_k: int = Field(200, ge=1, description="most search results per request")
    drain_timeout_s: float = Field(10.0, ge=0, description="on shutdown, how long queued work may finish")
    generator: str | None = Field(
        None, description="text-to-image generator for /v1/images/generations (e.g. shapes-gen); None: none"
    )
    max_generate_n: int = Field(10, ge=1, le=1024, description="most images per generation request")
    max_generate_steps: int = Field(100, ge=1, le=1000, description="most sampler steps per generation")
    max_generate_side: int = Field(1024, ge=8, description="largest image side (upscaled), pixels")
    generate_batch: int = Field(16, ge=1, description="most images in one denoiser call across requests")
    generate_timeout_s: float = Field(
        300.0, gt=0, description="longest a /v1/images/generations request may wait and run; beyond it 504"
    )
    chat: str | None = Field(
        None, description="chat model for /v1/chat/completions (e.g. shapes-chat, smollm2); None: none"
    )
    chat_batch: int = Field(16, ge=1, description="most requests decoding together in one step")
    max_chat_tokens: int = Field(512, ge=1, description="largest max_tokens of a chat request")
    max_chat_images: int = Field(4, ge=0, description="most images in one chat request")
    chat_timeout_s: float = Field(120.0, gt=0, description="longest wait for the next piece of a reply; 504")
    chat_fetch_urls: bool = Field(False, description="fetch http(s) image_url parts (else data: URLs only)")
    chat_fetch_timeout_s: float = Field(10.0, gt=0, description="time limit of one image URL fetch")
    task_timeout_s: float = Field(
        60.0, gt=0, description="longest a /vqa or /caption request may wait and run; beyond it 504"
    )

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        # a request larger than the whole queue could never be accepted
        self.max_inputs = min(self.max_inputs, self.max_queue)
        if any(not k.strip() for k in self.api_keys):
            raise ValueError("API keys must not be empty strings")
        return self
