"""The call pipeline every protocol adapter goes through between routing and the socket (issue 10).

admission.py  pure decisions: concurrency limit, go / hold / reject
outcome.py    pure: what a finished call means for its replica (ejection) and the upstream-error metric
ratelimit.py  rate limits and concurrency caps per API key and team: the token bucket, the pure
              decision, the RateLimit fields, and the worker's counters (issue 13)
"""
