"""Client protocols besides /inference, each a FastAPI router over the same Service (queue, limits, errors):
openai_images.py (OpenAI images API under /v1) and async_jobs.py (async jobs, polling, cancel, progress events).
No torch here."""
