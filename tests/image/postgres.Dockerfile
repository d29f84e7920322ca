# PostgreSQL from Debian's packages, standing in for the official postgres image where no
# registry can be reached: the same environment (POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB), data folder and port, so deploy/compose.yaml runs unchanged with
# POSTGRES_IMAGE set. Built on the local base (tests/image/conftest.py).
ARG BASE
FROM ${BASE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o postgres -g postgres -m 700 /var/lib/postgresql/data \
 && install -d -o postgres -g postgres /var/run/postgresql

COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh

ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data

USER postgres
EXPOSE 5432
ENTRYPOINT ["/bin/sh", "/usr/local/bin/postgres-entrypoint.sh"]
