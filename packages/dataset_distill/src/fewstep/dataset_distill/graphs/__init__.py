"""Graph dataset distillation: a TU-format reader, seeded synthetic graph datasets, GNN
classifiers (GCN, GIN, GAT), Mirage (frequent computation-tree sets) and gradient-matching
condensation (DosCond for graph classification, GCond for node classification).

Heavy imports (torch_geometric) happen inside the modules that need them; importing this
package is cheap."""
