"""Solvers for the probability-flow ODE, one ``sample()`` entry and one step function each."""
from .calls import PRECISIONS, NetworkCalls
from .loop import BoundSolver, CondTime, NextTime, Step
from .sampling import (MAX_NFE, SOLVERS, VARIANTS, SolverSpec, bind_solver, get_step_fn, near_nfes, nfe, sample,
                       solver_spec, step_orders, steps_for_nfe)
from .steps import (Coeffs, ModelFn, SolverState, StepFn, coeffs, ddim_step, dpm_solver_pp_step, euler_step, heun_step,
                    ipndm_step, uni_pc_step)

__all__ = ["sample", "nfe", "steps_for_nfe", "near_nfes", "MAX_NFE", "step_orders", "get_step_fn", "solver_spec", "SOLVERS", "VARIANTS",
           "SolverSpec", "bind_solver", "NetworkCalls", "PRECISIONS", "BoundSolver", "Step", "NextTime", "CondTime", "ModelFn", "StepFn",
           "Coeffs", "coeffs", "SolverState", "ddim_step", "euler_step", "heun_step", "dpm_solver_pp_step",
           "uni_pc_step", "ipndm_step"]
