"""The only package that imports fastapi, uvicorn and grpc."""
