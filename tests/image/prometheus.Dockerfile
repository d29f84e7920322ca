# Prometheus from Debian's packages, standing in for prom/prometheus where no registry can be
# reached: the same binary as entrypoint and /prometheus for its data, so deploy/compose.yaml
# runs unchanged with PROMETHEUS_IMAGE set. Built on the local base (tests/image/conftest.py).
ARG BASE
FROM ${BASE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o prometheus -g prometheus /prometheus

USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
