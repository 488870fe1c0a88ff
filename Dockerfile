# Slim multi-stage image: uv builds the locked virtualenv, the runtime stage only copies it.
FROM python:3.11-slim AS build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/app/.venv
RUN pip install --no-cache-dir "uv>=0.13"
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-default-groups --no-install-project
COPY conveyor ./conveyor
COPY api ./api
COPY worker ./worker
COPY domains ./domains
RUN uv sync --frozen --no-default-groups --no-editable

FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 conveyor
WORKDIR /app
COPY --from=build --chown=conveyor:conveyor /app/.venv /app/.venv
COPY --chown=conveyor:conveyor alembic.ini Procfile ./
COPY --chown=conveyor:conveyor migrations ./migrations
RUN mkdir -p /app/data && chown conveyor:conveyor /app/data
# Production unless told otherwise: the image refuses to start without strong secrets
# (CONVEYOR_SECRET_KEY, CONVEYOR_FLOWER_PASSWORD), and it never makes one up.
ENV PATH="/app/.venv/bin:$PATH" PYTHONUNBUFFERED=1 CONVEYOR_DATA_DIR=/app/data \
    CONVEYOR_ENV=production
USER conveyor
EXPOSE 8000 5555
CMD ["sh", "-c", "gunicorn --config python:api.gunicorn_config --bind ${CONVEYOR_API_BIND:-0.0.0.0:8000} --workers ${CONVEYOR_API_WORKERS:-2} --access-logfile - 'api:create_app()'"]
