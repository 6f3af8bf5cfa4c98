"""Step 1 of the pipeline: which channels go and how the rest compensate for them.

``graph`` (the channel dependency graph, over Torch-Pruning's), ``selection`` (which channels a
group keeps), ``similarity`` (filter similarity and the DBSCAN statistics of the MDP state) and
``reconstruction`` (Neuron Merging, UDFC and AutoDFP's closed-form compensation).
"""
