"""POST /v1/classify: a classifier folder (lmforge.apps.classify) served next to the generative model.

    request:  {"input": "text" | ["text", ...], "model"?: "name"}
    response: {"object": "list", "model": ..., "data": [{"object": "classification", "index", "label",
               "probabilities": {label: p}}], "usage": {"prompt_tokens", "total_tokens"}}

The request is a pydantic model; what a client can get wrong (no texts, an empty text, more than MAX_INPUTS texts,
a text longer than the classifier's context) is a 400 in OpenAI's error JSON naming the `input` parameter. A
server started without a classifier (`app.state.classifier` is None) answers 404 saying how to start one with
it. Classification runs in a worker thread, one batch at a time, so the event loop (and the generation engine)
keep running meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import ConfigDict, Field, field_validator

from lmforge.serve.errors import ApiError
from lmforge.serve.protocol import CheckedModel

MAX_INPUTS = 256  # texts per request


class ClassifyRequest(CheckedModel):
    """POST /v1/classify, shaped like OpenAI's /v1/moderations and /v1/embeddings (`input`, `model`)."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str] = Field(description="a text, or a list of texts, to classify")
    model: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_or_texts(cls, value):
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise ValueError("input must be a string or a list of strings")


class ClassifierService:
    """A loaded classifier: checks requests against its limits and classifies batches, one at a time."""

    def __init__(self, folder: str | Path, served_names: tuple[str, ...] = ()):
        from lmforge.apps.classifier import load_classifier

        self.folder = Path(folder)
        self.clf, self.encoder, self.meta = load_classifier(folder)
        self.name = self.folder.name
        self.names = {self.name, *served_names}
        self.lock = threading.Lock()

    def token_ids(self, req: ClassifyRequest) -> list[list[int]]:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise ApiError(400, "input is empty: give a text or a list of texts", "input")
        if len(texts) > MAX_INPUTS:
            raise ApiError(
                400, f"input has {len(texts)} texts; at most {MAX_INPUTS} are classified per request", "input"
            )
        seqs = []
        for i, text in enumerate(texts):
            where = "input" if isinstance(req.input, str) else f"input[{i}]"
            if not text.strip():
                raise ApiError(400, f"{where} is an empty text", "input")
            ids = self.encoder.ids(text)
            if len(ids) > self.encoder.max_tokens:
                raise ApiError(
                    400,
                    f"{where} is {len(ids)} tokens; this classifier reads at most "
                    f"{self.encoder.max_tokens}: shorten it",
                    "input",
                    code="context_length_exceeded",
                )
            seqs.append(ids)
        return seqs

    def classify(self, seqs: list[list[int]]) -> list[dict]:
        from lmforge.apps.classifier import predict_ids

        with self.lock:
            probs = predict_ids(self.clf, seqs).tolist()
        labels = self.clf.labels
        return [
            {
                "object": "classification",
                "index": i,
                "label": labels[max(range(len(p)), key=p.__getitem__)],
                "probabilities": dict(zip(labels, p)),
            }
            for i, p in enumerate(probs)
        ]


def get_classifier(request: Request) -> ClassifierService | None:
    return request.app.state.classifier


router = APIRouter()


@router.post("/v1/classify")
async def classify(req: ClassifyRequest, service: Annotated[ClassifierService | None, Depends(get_classifier)]):
    if service is None:
        raise ApiError(
            404,
            "this server has no classifier: start it with `lmforge serve MODEL --classifier "
            "DIR` (DIR made by `lmforge classify train`)",
            type="not_found_error",
            code="classifier_not_loaded",
        )
    if req.model is not None and req.model not in service.names:
        raise ApiError(
            404,
            f"the model {req.model!r} does not exist; the classifier here is {service.name!r}",
            "model",
            code="model_not_found",
        )
    seqs = service.token_ids(req)
    data = await asyncio.to_thread(service.classify, seqs)
    tokens = sum(map(len, seqs))
    return {
        "object": "list",
        "model": service.name,
        "created": int(time.time()),
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
