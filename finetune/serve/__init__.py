"""The trained model behind HTTP: `finetune serve` (FastAPI + uvicorn, the optional extra `serve`)."""
