"""`veil serve`: the seed APIs (Celantur v1, Celantur container, FaceBlurest; Celantur v2 and Syntonym
to come) over HTTP, each a thin translation onto the same JobSpec, operators and storage layout.

Modules: app (assembly, access log, `app_from_env`), service (config, capped uploads, the life of a
task), auth (users, tokens, API keys, Basic), tasks (task state in the storage), processor (one
image in-process: prepare -> detect -> write), pool (priority worker threads), params (the seed
query parameters -> JobSpec), errors (each API's error shape), celantur_v1, celantur_container,
faceblurest (the API shapes), serve (the CLI subcommand).
"""
