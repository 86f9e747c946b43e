"""Feature dashboards for WriteSAE atoms (issue #19): per atom, the top-activating contexts, the code's density and
histogram, the tokens whose keys align with p and whose values align with q, the logit effect of writing the atom
(the closed form's out-path) and, when given, its register / bundle class and substitution win rate; as static,
offline HTML pages (Jinja2) and as JSON with Neuronpedia's feature fields.

    from writesae_lens.dashboard import build_dashboard_data, write_dashboard
    data = build_dashboard_data(model, sae, layer, head, tokens, n_atoms=64)
    write_dashboard(data, folder)

``writesae dashboard`` runs both (docs/dashboards.md).
"""

from .data import AtomDashboard, DashboardData, atom_dashboards, build_dashboard_data, choose_atoms
from .render import neuronpedia_features, write_dashboard
from .scan import DashboardScan, scan_for_dashboards

__all__ = ["AtomDashboard", "DashboardData", "DashboardScan", "atom_dashboards", "build_dashboard_data",
           "choose_atoms", "neuronpedia_features", "scan_for_dashboards", "write_dashboard"]
