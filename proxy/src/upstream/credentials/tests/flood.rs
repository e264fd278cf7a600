//! Issue #10, point 7: the new-repository throttle against scripted
//! registries and realms.

use super::*;

fn limited_creds(burst: u32) -> RegistryCredentials {
    let limits = Limits {
        new_repository_tokens_per_minute: 1,
        new_repository_token_burst: burst,
        ..Limits::default()
    };
    creds("bot", "pw").limited(&limits)
}

fn manifest_of(s: &BearerSetup, repo: &str) -> (String, String) {
    (
        format!("http://{}/v2/{repo}/manifests/v1", s.registry.addr()),
        format!("repository:{repo}:pull"),
    )
}

/// Issue #10, point 7: each made-up repository name would be one token
/// request with the proxy's credentials. Past the burst the realm is not
/// asked, and once the registry is known to want tokens neither is the
/// registry: the caller gets `Throttled` with a retry time.
#[tokio::test]
async fn a_flood_of_new_repositories_asks_the_realm_at_most_the_burst() {
    let s = bearer_setup(Some(300)).await;
    let creds = limited_creds(5);
    let mut throttled = 0;
    for i in 0..50 {
        let (url, scope) = manifest_of(&s, &format!("missing/{i}"));
        match get(&creds, &s.upstreams, &url, Some(&scope)).await {
            Ok((status, _)) => assert_eq!(status, StatusCode::NOT_FOUND),
            Err(UpstreamError::Throttled {
                registry,
                retry_after,
            }) => {
                assert_eq!(registry, "reg.test");
                assert!(
                    (Duration::from_secs(1)..=Duration::from_secs(60)).contains(&retry_after),
                    "{retry_after:?}"
                );
                throttled += 1;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(throttled, 45);
    let tokens = s.realm.requests();
    assert_eq!(tokens.len(), 5, "{tokens:#?}");
    assert!(
        tokens
            .iter()
            .all(|t| t.auth() == Some(basic("bot", "pw").as_str()))
    );
    // A 401 and the retry for each of the five; none for the throttled.
    assert_eq!(s.registry.requests().len(), 10);
    let err = get(
        &creds,
        &s.upstreams,
        &manifest_of(&s, "missing/x").0,
        Some("repository:missing/x:pull"),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("reg.test")
            && err.to_string().contains("newRepositoryTokensPerMinute"),
        "{err}"
    );
}

/// The same bound for a registry that takes Basic: once it has asked for
/// Basic, every request carries the credentials, so requests for
/// repositories it never served draw from the throttle too; repositories
/// it served keep getting through.
#[tokio::test]
async fn a_flood_of_new_repositories_reaches_a_basic_registry_at_most_the_burst() {
    let want = basic("bot", "pw");
    let registry = routed(Ipv4Addr::LOCALHOST.into(), move |s| {
        if s.auth() != Some(want.as_str()) {
            respond(401, &[("www-authenticate", "Basic realm=\"reg\"")], "")
        } else if s.path.starts_with("/v2/team/app/") {
            respond(200, &[], "ok")
        } else {
            respond(404, &[], "")
        }
    });
    let upstreams = client_for(&format!("http://{}", registry.addr()));
    let creds = limited_creds(5);
    let url = |repo: &str| format!("http://{}/v2/{repo}/manifests/v1", registry.addr());
    let pull = async |repo: &str| {
        get(
            &creds,
            &upstreams,
            &url(repo),
            Some(&format!("repository:{repo}:pull")),
        )
        .await
    };
    assert_eq!(pull("team/app").await.unwrap().0, StatusCode::OK);
    let before = registry.requests().len();
    assert_eq!(before, 2, "401, then Basic");
    let mut throttled = 0;
    for i in 0..50 {
        match pull(&format!("missing/{i}")).await {
            Ok((status, _)) => assert_eq!(status, StatusCode::NOT_FOUND),
            Err(UpstreamError::Throttled { .. }) => throttled += 1,
            Err(other) => panic!("{other}"),
        }
    }
    // Five made-up names reach the registry (the burst), one request each;
    // the other 45 reach nothing.
    assert_eq!(throttled, 45);
    assert_eq!(registry.requests().len() - before, 5);
    // The repository already served is not throttled.
    for _ in 0..3 {
        assert_eq!(pull("team/app").await.unwrap().0, StatusCode::OK);
    }
}

/// A repository the upstream served with the credentials renews its token
/// without drawing from the throttle: a flood of made-up names cannot
/// starve real pulls. A 404'd made-up name never becomes such a
/// repository.
#[tokio::test]
async fn repositories_already_read_renew_their_tokens_under_a_flood() {
    let s = bearer_setup(Some(300)).await;
    let creds = limited_creds(2);
    let (app, app_scope) = manifest_of(&s, "team/app");
    assert_eq!(
        get(&creds, &s.upstreams, &app, Some(&app_scope))
            .await
            .unwrap()
            .0,
        StatusCode::OK
    );
    let (missing, missing_scope) = manifest_of(&s, "missing/one");
    assert_eq!(
        get(&creds, &s.upstreams, &missing, Some(&missing_scope))
            .await
            .unwrap()
            .0,
        StatusCode::NOT_FOUND
    );
    assert!(creds.is_known(&app_scope));
    assert!(!creds.is_known(&missing_scope), "a 404 made it known");
    // The bucket is empty now.
    let (flood, flood_scope) = manifest_of(&s, "missing/two");
    assert!(matches!(
        get(&creds, &s.upstreams, &flood, Some(&flood_scope)).await,
        Err(UpstreamError::Throttled { .. })
    ));
    // Both tokens expire (dropped as expiry would); only the repository
    // that was read gets a new one.
    for scope in [&app_scope, &missing_scope] {
        creds.tokens.lock().unwrap().remove(scope.as_str());
    }
    let asked = s.realm.requests().len();
    assert_eq!(
        get(&creds, &s.upstreams, &app, Some(&app_scope))
            .await
            .unwrap()
            .0,
        StatusCode::OK
    );
    assert_eq!(s.realm.requests().len(), asked + 1, "renewed");
    assert!(matches!(
        get(&creds, &s.upstreams, &missing, Some(&missing_scope)).await,
        Err(UpstreamError::Throttled { .. })
    ));
    assert_eq!(s.realm.requests().len(), asked + 1);
}

/// Concurrent requests for one new scope wait for one realm answer (and
/// draw one permit), as a runtime pulling several layers at once does.
#[tokio::test]
async fn concurrent_requests_for_one_scope_share_one_token_request() {
    let s = bearer_setup(Some(300)).await;
    let creds = Arc::new(limited_creds(1));
    let upstreams = Arc::new(s.upstreams);
    let (url, scope) = (
        format!("http://{}/v2/team/app/blobs/sha256:abc", s.registry.addr()),
        "repository:team/app:pull".to_string(),
    );
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (creds, upstreams, url, scope) =
                (creds.clone(), upstreams.clone(), url.clone(), scope.clone());
            tokio::spawn(async move { get(&creds, &upstreams, &url, Some(&scope)).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().0, StatusCode::OK);
    }
    assert_eq!(s.realm.requests().len(), 1);
    assert!(
        creds.fetching.lock().unwrap().is_empty(),
        "a gate outlived its requests"
    );
}
