"""The LoRAAdapter controller: Kubernetes resources that register adapters on the
running platform and grant them to tenants (GitOps for skills).

    apiVersion: hybridserve.dev/v1alpha1
    kind: LoRAAdapter
    metadata: {name: support-formal}
    spec: {source: support-formal/v3, tenants: [acme], default: true}

`reconcile` holds the logic against two small interfaces (the Kubernetes
object API and the platform's admin API); `main` runs it: one list, then a
watch from its resourceVersion, a per-object retry queue with backoff, and
Prometheus metrics. It runs outside Ray, as a Deployment of the Helm chart.
"""

GROUP = "hybridserve.dev"
VERSION = "v1alpha1"
PLURAL = "loraadapters"
KIND = "LoRAAdapter"
FINALIZER = "hybridserve.dev/unregister-adapter"
