"""The wire contract between coordinator and nodes.

- ``bulle.proto`` — messages and the ``Node`` service; ``bulle_pb2*`` are generated from it
  (``python -m federation.proto._codegen``) and committed; a test fails on drift.
- ``ops`` — the allow-list of expression operators a Plan may carry and their meaning in
  SQL. Both sides compile expressions through it, so an operator means the same thing at
  the coordinator's merge and at every node.

Importing this package loads no coordinator code (nodes depend on it).
"""
