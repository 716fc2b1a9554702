"""The trained model behind HTTP, for `finetune serve` (FastAPI + uvicorn, the optional extra `serve`)."""
