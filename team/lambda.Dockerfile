# The Bento's image on AWS Lambda: the AWS Lambda Web Adapter (an extension) turns Lambda invocations into HTTP
# requests to the BentoML server on port 3000; the image itself is unchanged. Built by .github/workflows/release.yml:
#   docker build -f team/lambda.Dockerfile --build-arg IMAGE=<registry>/<repo>:<tag> -t <registry>/<repo>:<tag>-lambda .
ARG IMAGE
FROM public.ecr.aws/awsguru/aws-lambda-adapter:0.9.1 AS adapter
FROM ${IMAGE}
COPY --from=adapter /lambda-adapter /opt/extensions/lambda-adapter
# readiness as BentoML defines it; the model loads at start, so give the init phase the health check to wait on
ENV AWS_LWA_PORT=3000 AWS_LWA_READINESS_CHECK_PATH=/readyz AWS_LWA_ASYNC_INIT=true \
    OMP_NUM_THREADS=1 BENTOML_DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
# Lambda's filesystem is read-only but /tmp: the prediction log (serve.prediction_log, under the Bento's src/) goes
# there, per instance and lost with it; ship it elsewhere (e.g. S3) if the monitor is to read it
RUN rm -rf /home/bentoml/bento/src/build/serving/predictions && mkdir -p /home/bentoml/bento/src/build/serving && \
    ln -s /tmp/predictions /home/bentoml/bento/src/build/serving/predictions
