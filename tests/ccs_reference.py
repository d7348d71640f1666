"""A port of Coverage-centric Coreset Selection's selection code (Zheng, Liu, Li & Prakash,
"Coverage-centric Coreset Selection for High Pruning Rates", ICLR 2023), for the tests.

From github.com/haizhongzheng/Coverage-centric-coreset-selection, ``core/data/Coreset.py``
(``CoresetSelection.mislabel_mask`` and ``stratified_sampling``) and ``train.py`` (the
``--coreset-mode stratified`` branch), kept line for line except: the number of strata and the
random generator are arguments, the printing is gone, and each stratum's members are returned
so a test can compare the budgets exactly (the draw within a stratum is random in both).
"""

from __future__ import annotations

import torch


def mislabel_mask(data_score, mis_key, mis_num, mis_descending, coreset_key):
    mis_score = data_score[mis_key]
    mis_score_sorted_index = mis_score.argsort(descending=mis_descending)
    hard_index = mis_score_sorted_index[:mis_num]
    del hard_index
    easy_index = mis_score_sorted_index[mis_num:]
    data_score[coreset_key] = data_score[coreset_key][easy_index]
    return data_score, easy_index


def stratified_sampling(data_score, coreset_key, coreset_num, stratas=50, generator=None):
    score = data_score[coreset_key]
    total_num = coreset_num

    min_score = torch.min(score)
    max_score = torch.max(score) * 1.0001
    step = (max_score - min_score) / stratas

    def bin_range(k):
        return min_score + k * step, min_score + (k + 1) * step

    strata_num = []
    for i in range(stratas):
        start, end = bin_range(i)
        num = torch.logical_and(score >= start, score < end).sum()
        strata_num.append(num)

    strata_num = torch.tensor(strata_num)

    def bin_allocate(num, bins):
        sorted_index = torch.argsort(bins)
        sort_bins = bins[sorted_index]
        num_bin = bins.shape[0]
        rest_exp_num = num
        budgets = []
        for i in range(num_bin):
            rest_bins = num_bin - i
            avg = rest_exp_num // rest_bins
            cur_num = min(sort_bins[i].item(), avg)
            budgets.append(cur_num)
            rest_exp_num -= cur_num
        rst = torch.zeros((num_bin,)).type(torch.int)
        rst[sorted_index] = torch.tensor(budgets).type(torch.int)
        return rst

    budgets = bin_allocate(total_num, strata_num)

    selected_index = []
    strata = []
    sample_index = torch.arange(data_score[coreset_key].shape[0])
    for i in range(stratas):
        start, end = bin_range(i)
        mask = torch.logical_and(score >= start, score < end)
        pool = sample_index[mask]
        rand_index = torch.randperm(pool.shape[0], generator=generator)
        selected_index += [idx.item() for idx in pool[rand_index][: budgets[i]]]
        strata.append(pool)
    return selected_index, budgets, strata


def ccs(coreset_score, aum, coreset_num, mis_num, stratas=50, generator=None):
    """train.py's stratified branch: cut the ``mis_num`` lowest-AUM examples, then stratify.

    Returns (selected dataset indices, per-stratum budgets, per-stratum dataset indices, the
    indices cut off).
    """
    data_score = {"accumulated_margin": aum, "score": coreset_score}
    data_score, score_index = mislabel_mask(
        data_score,
        mis_key="accumulated_margin",
        mis_num=mis_num,
        mis_descending=False,
        coreset_key="score",
    )
    selected, budgets, strata = stratified_sampling(
        data_score, "score", coreset_num, stratas=stratas, generator=generator
    )
    cut = aum.argsort(descending=False)[:mis_num]
    return (
        score_index[torch.tensor(selected, dtype=torch.int64)],
        budgets,
        [score_index[s] for s in strata],
        cut,
    )
