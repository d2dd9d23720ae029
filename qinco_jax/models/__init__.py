"""The models and how they turn vectors into codes and back.

    qinco      the QINCo family in Flax: QINCo v1 steps, QINCo2 steps (projections, outer
               skip, substep pre-selection), greedy and beam encoding, decoding, losses
    pairwise   the pairwise additive decoder (QINCo2's middle search stage)
    codec      batched, jitted encode / decode on numpy arrays in raw units
"""
