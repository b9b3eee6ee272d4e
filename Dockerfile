# The main job in a container: the README's two set-up commands, nothing else.
#   docker build -t r2d2 .
#   docker run --gpus all --shm-size=8g r2d2        (docs/containers.md: --shm-size, --cpus, --memory)
# torch==2.13.0 from PyPI is its CUDA build on Linux: the learner uses the GPU where --gpus gives one.
FROM python:3.11-slim
WORKDIR /r2d2
ENV PIP_NO_CACHE_DIR=1
COPY . .
RUN pip install -r requirements.txt
CMD ["python", "r2d2_algo/r2d2_mp.py"]
