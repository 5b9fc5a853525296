"""`veil serve`: the seed APIs (Celantur v1, v2 and container, Syntonym, FaceBlurest) over HTTP, each
a thin translation onto the same JobSpec, operators, storage layout and job accounting.

Modules: app (assembly, access log, `app_from_env`), config (ServiceConfig), service (capped and streamed uploads,
the life of a task), service_jobs (jobs made through the API: uploads, quote, approval, run,
report), credits (API keys' balances), links (expiring signed or presigned URLs), auth (users,
tokens, API keys, Basic), tasks (task state in the storage), processor (images in-process:
prepare -> detect -> write), pool (priority worker threads), params (the seed query parameters ->
JobSpec), errors (each API's error shape), celantur_v1, celantur_container, celantur_v2, syntonym,
faceblurest (the API shapes), ray_jobs (API jobs on a Ray cluster), recovery (taking over from stopped
replicas). The `veil serve` command is jobs/cli/serve.py.
"""
