# The toolkit in an image:  docker build -t train-to-edge .  &&  docker run train-to-edge run toy
FROM python:3.11-slim-bookworm

RUN apt-get update && apt-get install -y --no-install-recommends nodejs npm git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml ./
COPY scripts/setup.sh scripts/setup.sh
COPY pipeline/__init__.py pipeline/__init__.py
RUN touch README.md && mkdir -p exporters parity serving edge pipeline/specs \
    && VENV=/opt/venv bash scripts/setup.sh
COPY . .
RUN VENV=/opt/venv bash scripts/setup.sh
ENV PATH=/opt/venv/bin:$PATH PIPELINE_HOME=/work MLFLOW_DISABLE_TELEMETRY=true
WORKDIR /work
ENTRYPOINT ["python", "-m", "pipeline"]
CMD ["run", "toy"]
