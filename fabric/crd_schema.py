# ruff: noqa: E501
"""The Cluster CRD's ``openAPIV3Schema``, for the fabric package (the image has no deploy/).

GENERATED from ``deploy/base/host/crd-clusters.yaml``, the one source of the schema: never edit
this file; after changing the CRD run ``FABRIC_UPDATE_GOLDEN=1 pytest tests/unit/test_deploy_crd.py``
(a unit test fails while the two differ).
"""

from __future__ import annotations

import json
from typing import Any

OPENAPI_V3_SCHEMA: dict[str, Any] = json.loads(r"""
{
 "type": "object",
 "description": "A member cluster of the Kosmos fabric and how it links to the others.",
 "properties": {
  "apiVersion": {
   "type": "string"
  },
  "kind": {
   "type": "string"
  },
  "metadata": {
   "type": "object"
  },
  "spec": {
   "type": "object",
   "default": {},
   "properties": {
    "namespace": {
     "type": "string",
     "description": "Namespace of the member cluster the agent DaemonSet runs in.",
     "default": "kosmos-system",
     "maxLength": 63,
     "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    },
    "clusterLinkOptions": {
     "type": "object",
     "default": {},
     "description": "How the cluster's pods and services are linked to the other clusters.",
     "properties": {
      "enable": {
       "type": "boolean",
       "default": true,
       "description": "false keeps the Cluster but takes it out of the fabric."
      },
      "networkType": {
       "type": "string",
       "enum": [
        "p2p",
        "gateway"
       ],
       "default": "p2p",
       "description": "p2p - every node tunnels straight to the remote node owning a pod CIDR; gateway - only the active gateway tunnels to other clusters, the other nodes reach it over vx-local."
      },
      "ipFamilies": {
       "type": "array",
       "description": "Address families linked, primary first, named as in Kubernetes Services (IPv4, IPv6). Absent - the families of the cluster's pod CIDRs (IPv4 when there are none); status.clusterLinkStatus.ipFamilies shows the result.",
       "minItems": 1,
       "maxItems": 2,
       "x-kubernetes-list-type": "set",
       "items": {
        "type": "string",
        "enum": [
         "IPv4",
         "IPv6"
        ]
       }
      },
      "podCIDRs": {
       "type": "array",
       "description": "Pod CIDRs of the cluster; every node's must lie inside them. Absent: discovery mode, the union of the pod CIDRs the nodes announce (from their Node's spec.podCIDRs; the status shows what is used).",
       "maxItems": 32,
       "x-kubernetes-list-type": "set",
       "items": {
        "type": "string",
        "maxLength": 43,
        "pattern": "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])[.]){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/([0-9]|[12][0-9]|3[0-2])$|^[0-9a-fA-F:.]*:[0-9a-fA-F:.]*/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8])$"
       }
      },
      "serviceCIDRs": {
       "type": "array",
       "description": "Service CIDRs when the member has no ServiceCIDR API (networking.k8s.io, Kubernetes 1.33+); never read from kube-apiserver arguments.",
       "maxItems": 32,
       "x-kubernetes-list-type": "set",
       "items": {
        "type": "string",
        "maxLength": 43,
        "pattern": "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])[.]){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/([0-9]|[12][0-9]|3[0-2])$|^[0-9a-fA-F:.]*:[0-9a-fA-F:.]*/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8])$"
       }
      },
      "nodeCIDRs": {
       "type": "array",
       "description": "Gateway mode: the subnets the cluster's nodes' underlay addresses are in. Other clusters then route the cluster's vx-local addresses as these fixed ranges, so a node joining or leaving inside them changes no other cluster's routes. Absent: the widest prefixes around the nodes' addresses that hold no other cluster's (another cluster's node among them splits them). A node outside them is routed by the prefix around it.",
       "maxItems": 32,
       "x-kubernetes-list-type": "set",
       "items": {
        "type": "string",
        "maxLength": 43,
        "pattern": "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])[.]){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/([0-9]|[12][0-9]|3[0-2])$|^[0-9a-fA-F:.]*:[0-9a-fA-F:.]*/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8])$"
       }
      },
      "globalCIDRsMap": {
       "type": "object",
       "description": "Global IP: real CIDR (one of the pod/service CIDRs) to a global CIDR of the same prefix length; other clusters see and route only the global one. Required for CIDRs that overlap another cluster's.",
       "maxProperties": 64,
       "additionalProperties": {
        "type": "string",
        "maxLength": 43,
        "pattern": "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])[.]){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/([0-9]|[12][0-9]|3[0-2])$|^[0-9a-fA-F:.]*:[0-9a-fA-F:.]*/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8])$"
       },
       "x-kubernetes-validations": [
        {
         "rule": "self.all(k, k.endsWith('/' + self[k].split('/')[1]))",
         "message": "a global CIDR must have the same prefix length as the CIDR it maps"
        }
       ]
      },
      "gatewayCandidates": {
       "type": "array",
       "description": "Node names allowed to be the cluster's gateway, in order of preference (empty - every node). P2P clusters use a gateway for service CIDRs too.",
       "maxItems": 64,
       "x-kubernetes-list-type": "set",
       "items": {
        "type": "string",
        "maxLength": 253
       }
      },
      "activeGateways": {
       "type": "integer",
       "minimum": 1,
       "maximum": 8,
       "default": 1,
       "description": "Gateway mode: how many gateways carry the cluster's traffic at once (1 - one active gateway and a hot standby). With N > 1 other clusters and the cluster's own nodes route through the N actives as one resilient nexthop group, so losing one moves only its share of flows (kernel >= 5.13)."
      },
      "defaultNICName": {
       "type": "string",
       "default": "*",
       "maxLength": 15,
       "description": "Underlay interface of every node; '*' - chosen by autodetectionMethod."
      },
      "nicNodeNames": {
       "type": "array",
       "description": "Per-node interface overrides (win over defaultNICName).",
       "maxItems": 64,
       "items": {
        "type": "object",
        "required": [
         "interfaceName",
         "nodeName"
        ],
        "properties": {
         "interfaceName": {
          "type": "string",
          "minLength": 1,
          "maxLength": 15
         },
         "nodeName": {
          "type": "array",
          "minItems": 1,
          "maxItems": 1024,
          "x-kubernetes-list-type": "set",
          "items": {
           "type": "string",
           "maxLength": 253
          }
         }
        }
       }
      },
      "autodetectionMethod": {
       "type": "string",
       "default": "kubernetes-internal-ip",
       "maxLength": 256,
       "pattern": "^(kubernetes-internal-ip|first-found|can-reach=[0-9a-fA-F:.]+|interface=.+)$",
       "description": "How a node finds its underlay address when the NIC is '*': kubernetes-internal-ip (the Node's InternalIP; no outside reachability needed), first-found, can-reach=IP (the source address towards IP), interface=REGEX (first matching interface)."
      }
     }
    },
    "clusterTreeOptions": {
     "type": "object",
     "default": {},
     "description": "ClusterTree - this cluster is a leaf of the host cluster, seen there as virtual nodes kept by kosmos-tree.",
     "properties": {
      "enable": {
       "type": "boolean",
       "default": false
      },
      "kubeconfigSecretRef": {
       "type": "object",
       "description": "The Secret (in the host cluster) whose key \"kubeconfig\" holds the leaf cluster's kubeconfig; required when enable is true.",
       "required": [
        "namespace",
        "name"
       ],
       "properties": {
        "namespace": {
         "type": "string",
         "maxLength": 63,
         "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
        },
        "name": {
         "type": "string",
         "maxLength": 253,
         "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
        }
       }
      },
      "leafNodeMode": {
       "type": "string",
       "enum": [
        "cluster",
        "node",
        "party"
       ],
       "description": "cluster - one virtual node kosmos-CLUSTER for the whole leaf; node - one virtual node per leaf node (same name), for the leaf nodes the leafModels select (none - every leaf node); party - one virtual node kosmos-CLUSTER-LEAFNODENAME per leafModel, for the leaf nodes its labelSelector selects. Absent - as Kosmos decides it, from leafModels (none - cluster, nodeSelector.nodeName - node, labelSelector - party)."
      },
      "leafModels": {
       "type": "array",
       "maxItems": 256,
       "items": {
        "type": "object",
        "properties": {
         "leafNodeName": {
          "type": "string",
          "maxLength": 253
         },
         "labels": {
          "type": "object",
          "additionalProperties": {
           "type": "string"
          }
         },
         "taints": {
          "type": "array",
          "items": {
           "type": "object",
           "required": [
            "key",
            "effect"
           ],
           "properties": {
            "key": {
             "type": "string"
            },
            "value": {
             "type": "string"
            },
            "effect": {
             "type": "string",
             "enum": [
              "NoSchedule",
              "PreferNoSchedule",
              "NoExecute"
             ]
            },
            "timeAdded": {
             "type": "string",
             "format": "date-time"
            }
           }
          }
         },
         "nodeSelector": {
          "type": "object",
          "properties": {
           "nodeName": {
            "type": "string"
           },
           "labelSelector": {
            "type": "object",
            "x-kubernetes-map-type": "atomic",
            "properties": {
             "matchLabels": {
              "type": "object",
              "additionalProperties": {
               "type": "string"
              }
             },
             "matchExpressions": {
              "type": "array",
              "items": {
               "type": "object",
               "required": [
                "key",
                "operator"
               ],
               "properties": {
                "key": {
                 "type": "string"
                },
                "operator": {
                 "type": "string"
                },
                "values": {
                 "type": "array",
                 "items": {
                  "type": "string"
                 }
                }
               }
              }
             }
            }
           }
          }
         }
        }
       }
      }
     }
    }
   }
  },
  "status": {
   "type": "object",
   "description": "Written by fabric-reflector; what the fabric actually uses.",
   "properties": {
    "observedGeneration": {
     "type": "integer",
     "format": "int64"
    },
    "clusterLinkStatus": {
     "type": "object",
     "properties": {
      "ipFamilies": {
       "type": "array",
       "description": "Address families in effect, primary first.",
       "items": {
        "type": "string"
       }
      },
      "podCIDRs": {
       "type": "array",
       "description": "Pod CIDRs in use (the spec's, else the union of the nodes' podCIDRs).",
       "items": {
        "type": "string"
       }
      },
      "serviceCIDRs": {
       "type": "array",
       "description": "Service CIDRs in use (ServiceCIDR API, else the spec's).",
       "items": {
        "type": "string"
       }
      },
      "activeGateway": {
       "type": "string"
      },
      "nodeCount": {
       "type": "integer"
      },
      "nodes": {
       "type": "array",
       "x-kubernetes-list-type": "map",
       "x-kubernetes-list-map-keys": [
        "name"
       ],
       "items": {
        "type": "object",
        "required": [
         "name"
        ],
        "properties": {
         "name": {
          "type": "string"
         },
         "address": {
          "type": "string",
          "description": "Underlay address the node tunnels from."
         },
         "interfaceName": {
          "type": "string"
         },
         "podCIDRs": {
          "type": "array",
          "items": {
           "type": "string"
          }
         },
         "gateway": {
          "type": "boolean"
         },
         "inSync": {
          "type": "boolean",
          "description": "The agent applied the latest plan for this node."
         }
        }
       }
      },
      "conflicts": {
       "type": "array",
       "description": "Why (part of) the spec is not in effect.",
       "items": {
        "type": "object",
        "required": [
         "field",
         "reason"
        ],
        "properties": {
         "field": {
          "type": "string",
          "description": "Field path in this Cluster, e.g. spec.clusterLinkOptions.podCIDRs[0]."
         },
         "reason": {
          "type": "string"
         },
         "cluster": {
          "type": "string",
          "description": "The other Cluster involved, if any."
         }
        }
       }
      }
     }
    },
    "clusterTreeStatus": {
     "type": "object",
     "x-kubernetes-preserve-unknown-fields": true
    },
    "conditions": {
     "type": "array",
     "x-kubernetes-list-type": "map",
     "x-kubernetes-list-map-keys": [
      "type"
     ],
     "items": {
      "type": "object",
      "required": [
       "type",
       "status",
       "lastTransitionTime",
       "reason",
       "message"
      ],
      "properties": {
       "type": {
        "type": "string",
        "maxLength": 316,
        "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
       },
       "status": {
        "type": "string",
        "enum": [
         "True",
         "False",
         "Unknown"
        ]
       },
       "observedGeneration": {
        "type": "integer",
        "format": "int64",
        "minimum": 0
       },
       "lastTransitionTime": {
        "type": "string",
        "format": "date-time"
       },
       "reason": {
        "type": "string",
        "maxLength": 1024,
        "minLength": 1,
        "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
       },
       "message": {
        "type": "string",
        "maxLength": 32768
       }
      }
     }
    }
   }
  }
 }
}
""")
