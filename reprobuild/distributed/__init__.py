"""Building a plan on a Dask cluster, with a binary cache as the data plane.

``address`` parses cluster addresses and makes the TLS ``Security`` of each role;
``certs`` makes a cluster's CA and certificates; ``task`` is what one Dask task carries
and what it runs on a worker; ``plugin`` is a worker's reprobuild state (store, sandbox
fork server, cache, signing key); ``executor`` is the client side, an
:class:`~reprobuild.build.executor.Executor`; ``worker`` starts a Dask worker set up
for reprobuild.
"""
