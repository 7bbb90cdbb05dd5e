"""The async jobs' HTTP models (the state a poll returns), for validation and the OpenAPI document."""

from __future__ import annotations

from pydantic import BaseModel, Field

from flux_kontext.schemas import ErrorBody, InferenceResponse


class JobUrls(BaseModel):
    get: str = Field(..., examples=["/v1/jobs/job-0123abcd"])
    cancel: str = Field(..., description="DELETE this URL to cancel.")
    events: str = Field(..., description="Server-Sent Events: queued, progress (each step), then the outcome.")
    image: str = Field(..., description="The first image as raw bytes once succeeded (?index=i for the others).")


class JobProgress(BaseModel):
    step: int = Field(..., description="Denoising steps done.")
    steps: int = Field(..., description="Denoising steps in all.")


class JobWebhookDelivery(BaseModel):
    delivered: bool = Field(..., description="The receiver answered 2xx.")
    pending: bool = Field(..., description="Still being sent, or waiting to retry.")
    attempts: int
    status_code: int | None = Field(None, description="The receiver's last status; none after a network error.")
    error: str | None = Field(None, description="Why the last attempt did not deliver.")


class JobWebhook(BaseModel):
    url: str
    events: list[str] = Field(..., examples=[["completed"]])
    deliveries: dict[str, JobWebhookDelivery] | None = Field(
        None, description="By event (start, completed), once it has happened; not in the webhook's own body."
    )


class JobState(BaseModel):
    id: str
    status: str = Field(..., description="queued | running | succeeded | failed | cancelled")
    created_at: float = Field(..., description="Unix time of the submission.")
    urls: JobUrls
    progress: JobProgress | None = Field(None, description="running (and cancelled while running).")
    eta_s: float | None = Field(None, description="running: remaining steps at the step rate so far.")
    result: InferenceResponse | None = Field(None, description="succeeded: what POST /inference returns.")
    status_code: int | None = Field(None, description="failed: the status /inference would have answered.")
    error: ErrorBody | None = Field(None, description="failed: the error envelope's body.")
    webhook: JobWebhook | None = Field(None, description="Where the job's webhook goes and how its deliveries went.")
