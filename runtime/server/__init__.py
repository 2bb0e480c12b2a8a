"""The only package that imports fastapi, uvicorn, grpc and hpack."""
