"""The training runtime without Ray: topology, typed step plans/results, the stage worker and the controller.

Modules are imported directly (``from raymoe.train.topology import Topology``); this package file stays light so
that importing one piece does not pull in DeepSpeed or torch.distributed set-up.
"""
