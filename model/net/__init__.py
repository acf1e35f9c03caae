"""The network: building blocks, cross-task guided attention, OM-Net and its ablations,
and checkpoints that rebuild their model. Imports only the root modules of ``model``.
"""
