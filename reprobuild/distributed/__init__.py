"""Building a plan on a Dask cluster, with a binary cache as the data plane.

``address`` parses cluster addresses and finds the TLS files of each role; ``cluster``
is the Dask side of a client (connect, submit, follow), loaded only when tasks run;
``certs`` makes a cluster's CA and certificates; ``task`` is what one Dask task carries
and what it runs on a worker; ``plugin`` is a worker's reprobuild state (store, sandbox
fork server, cache, signing key); ``executor`` is the client side, an
:class:`~reprobuild.build.executor.Executor`; ``worker`` starts a Dask worker set up
for reprobuild.
"""
