"""Under xdist (two workers on the two cores of CI) each worker keeps one BLAS thread: a second would only
contend with the other worker, and idle OpenBLAS threads spin, slowing the smoke lab's training beside them."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    import scipy.linalg  # noqa: F401 - load scipy's BLAS so that the limit reaches it
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
