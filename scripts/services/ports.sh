# Loopback ports and URLs of the test services (mirrored in tests/support).
export CELER_TEST_REDIS_PORT=6390
export CELER_TEST_REDIS_URL="redis://127.0.0.1:${CELER_TEST_REDIS_PORT}"
export CELER_TEST_SMTP_PORT=2525
export CELER_TEST_SMTP_URL="smtp://127.0.0.1:${CELER_TEST_SMTP_PORT}"
export CELER_TEST_S3_PORT=8014
export CELER_TEST_S3_ENDPOINT="http://127.0.0.1:${CELER_TEST_S3_PORT}"
export CELER_TEST_S3_BUCKET=celer-test
export CELER_TEST_S3_ACCESS_KEY=testing
export CELER_TEST_S3_SECRET_KEY=testing
export CELER_TEST_PG_PORT=5433
export CELER_TEST_DATABASE_URL="postgres://celer:celer@127.0.0.1:${CELER_TEST_PG_PORT}/celer_test"
