# Loopback ports and URLs of the test services (mirrored in tests/support).
export CELER_TEST_REDIS_PORT=6390
export CELER_TEST_REDIS_URL="redis://127.0.0.1:${CELER_TEST_REDIS_PORT}"
